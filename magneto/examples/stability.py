"""Is Magneto stable where other norm schemes are not? Learning-rate sensitivity across depth.

Decoder-only byte-level language models in five norm schemes — Post-LN, Pre-LN, DeepNorm,
Sub-LN with the plain initialisation (the ablation) and Magneto (Sub-LN with its DeepNet-derived
init) — are trained over a grid of learning rates at several depths, with and without a short
warm-up (Wortsman et al., 2023, "Small-scale proxies for large-scale Transformer training
instabilities"). An unstable architecture's usable learning-rate range narrows with depth and its
loss blows up at high rates. The text is the Python standard library as installed, split into
train and validation by file (``magneto.examples.data``).

    python -m magneto.examples.stability --quick           # a small sweep, a few minutes
    python -m magneto.examples.stability                   # the full sweep: 90 min on 2 idle cores
    python -m magneto.examples.stability --measure-update  # DeepNet's one-step update size

The sweep is resumable: each finished run is appended to ``stability-runs.jsonl`` in
``--out-dir`` (default ``./results``), keyed by its settings, and a rerun skips what is done.
After a first pass with one seed, the learning rates on either side of each scheme's divergence
edge are rerun with more seeds (``--seeds``). The outputs are ``stability.png`` (final loss
against learning rate, a panel per depth and warm-up), ``stability-sensitivity.png`` (LR
sensitivity against depth) and ``stability.md`` (tables); ``magneto.examples.sweep`` plans and
runs the grid, ``magneto.examples.stability_report`` draws and tabulates.

One run (``train_run``): Adam (betas 0.9/0.98, no weight decay, no clipping) at the run's peak
learning rate, linear warm-up over ``warmup`` steps, then cosine decay to a tenth of the peak at
the last step. A run *diverges* when its loss or gradient norm turns NaN/inf, or when its loss
is above the initial loss (the validation loss at initialisation) and stays there: for
``patience`` steps of training (10-step mean; the run is stopped), or at the end (final
validation loss not below the initial one).

The mechanism behind the claim (DeepNet, Wang et al. 2022, §3): with Post-LN the change of the
model's output caused by one optimizer step at initialisation grows with depth, and a large early
update throws training into a bad region; DeepNorm and Magneto's initialisation bound it.
``relative_update`` measures that quantity, ‖F(x; θ+Δθ) − F(x; θ)‖ / ‖F(x; θ)‖ after one Adam
step; every run of the sweep records it for its own first step.
"""

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import magneto
from magneto.examples.data import VOCAB_SIZE, fixed_windows, load_corpus, random_windows

SCHEMES = ("post", "pre", "deepnorm", "subln_plain", "subln")
LABELS = {
    "post": "Post-LN",
    "pre": "Pre-LN",
    "deepnorm": "DeepNorm",
    "subln_plain": "Sub-LN, plain init",
    "subln": "Magneto (Sub-LN + init)",
}
DEFAULT_OUT_DIR = Path("results")  # under the current directory


def build_model(scheme, layers, width, heads, ffn_dim, max_positions, vocab_size=VOCAB_SIZE):
    """A magneto decoder-only LM in the given norm scheme, with the paper's initialisation.

    ``"subln_plain"`` is Magneto's architecture with Pre-LN's initialisation (gain 1 everywhere),
    which ``MagnetoConfig`` has no field for: Pre-LN is built first from the same random state and
    its parameters are copied into the Sub-LN model. The two draw the same numbers in the same
    order (Sub-LN's extra norms draw none), so the result is exactly Magneto's model with the
    gained weights (v_proj, out_proj, fc1, fc2) divided by its gain (``tests/test_stability.py``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    config = magneto.MagnetoConfig(
        embed_dim=width,
        num_heads=heads,
        ffn_dim=ffn_dim,
        decoder_layers=layers,
        vocab_size=vocab_size,
        activation="gelu",
        dropout=0.0,
        norm_scheme="subln" if scheme == "subln_plain" else scheme,
        init="paper",
        max_positions=max_positions,
    )
    if scheme != "subln_plain":
        return magneto.Decoder(config)
    with torch.random.fork_rng(devices=[]):
        plain = magneto.Decoder(config.replace(norm_scheme="pre")).state_dict()
    model = magneto.Decoder(config)
    missing, unexpected = model.load_state_dict(plain, strict=False)
    state = model.state_dict()  # what Pre-LN lacks must be Sub-LN's norms: constant, not drawn
    drawn = [name for name in missing if not state[name].eq(state[name].flatten()[0]).all()]
    if unexpected or drawn:
        raise RuntimeError(
            f"Pre-LN's parameters no longer map onto Sub-LN's: random {drawn[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    return model


def lm_loss(model, inputs, targets):
    """Mean next-token cross-entropy (nats per byte)."""
    logits, _ = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, inputs, targets, batch_size):
    """Mean validation loss over fixed windows (token-weighted; all windows have one length)."""
    model.eval()
    total = 0.0
    for i in range(0, len(inputs), batch_size):
        chunk = slice(i, i + batch_size)
        total += lm_loss(model, inputs[chunk], targets[chunk]).item() * len(inputs[chunk])
    model.train()
    return total / len(inputs)


def unigram_loss(train, targets):
    """Validation loss of the training bytes' frequencies (add-one smoothed), ignoring all context.

    A model at this loss has learnt nothing but how common each byte is; leaving it is the first
    sign that attention and depth are doing something.
    """
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1.0
    return -(counts / counts.sum()).log()[targets].mean().item()


class DivergenceDetector:
    """Decides when a training run has diverged (the rule of the module docstring).

    ``update`` takes each step's loss and gradient norm. A NaN/inf diverges at once. Otherwise the
    mean of the last ``window`` losses is compared with ``initial_loss`` once ``window`` steps
    have run; ``above_since`` is the step from which that mean has stayed above it (None while it
    is not above), and ``patience`` steps of it diverge the run. A spike the run recovers from is
    tolerated. ``diverged_at``: the step of the NaN/inf, or ``above_since``, once diverged.
    """

    def __init__(self, initial_loss, window=10, patience=30):
        if not math.isfinite(initial_loss):
            raise ValueError(f"initial_loss must be finite, got {initial_loss}")
        if window < 1 or patience < 1:
            raise ValueError(f"window and patience must be >= 1, got {window}, {patience}")
        self.initial_loss, self.window, self.patience = initial_loss, window, patience
        self.above_since = self.diverged_at = None
        self._recent = []
        self._step = 0

    def update(self, loss, grad_norm=0.0):
        """Feed one step's loss and gradient norm; returns the reason for divergence, or None."""
        self._step += 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.diverged_at = self._step
            return f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        self._recent = (self._recent + [loss])[-self.window :]
        if len(self._recent) < self.window:
            return None
        mean = sum(self._recent) / self.window
        if mean <= self.initial_loss:
            self.above_since = None
            return None
        if self.above_since is None:
            self.above_since = self._step
        if self._step - self.above_since + 1 >= self.patience:
            self.diverged_at = self.above_since
            return (
                f"{self.window}-step mean loss above the initial {self.initial_loss:.3f} "
                f"for {self.patience} steps (now {mean:.3f})"
            )
        return None


@dataclass(frozen=True)
class Setup:
    """What every run of a sweep shares: model shape, data, length and the divergence rule."""

    width: int = 64
    heads: int = 4
    ffn_dim: int = 256
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 120
    valid_windows: int = 32
    train_bytes: int = 4_000_000
    valid_bytes: int = 400_000
    window: int = 10
    patience: int = 30


@dataclass(frozen=True)
class Run:
    """One point of the sweep."""

    scheme: str
    layers: int
    lr: float
    warmup: int
    seed: int


def lr_factor(step, warmup, steps):
    """The learning rate of ``step`` (1-based) as a fraction of the peak: linear warm-up over
    ``warmup`` steps, then cosine decay from 1 to 0.1 at ``steps``."""
    ramp = min(1.0, step / warmup) if warmup > 0 else 1.0
    progress = max(0, step - warmup) / max(1, steps - warmup)
    return ramp * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Data:
    """The corpus of a setup with its fixed validation windows and unigram baseline."""

    train: torch.Tensor
    valid_inputs: torch.Tensor
    valid_targets: torch.Tensor
    unigram: float

    @classmethod
    def load(cls, setup):
        corpus = load_corpus(train_bytes=setup.train_bytes, valid_bytes=setup.valid_bytes)
        inputs, targets = fixed_windows(corpus.valid, setup.valid_windows, setup.seq_len)
        return cls(corpus.train, inputs, targets, unigram_loss(corpus.train, targets))


def train_run(run, setup, data):
    """Train one run from its seed; stops early if it diverges. Returns its results as a dict.

    The seed fixes both the init and the batch order, so runs that differ only in scheme, depth
    or learning rate see the same batches. ``first_update`` is DeepNet's update size for the
    first optimizer step as taken (under warm-up, at lr/warmup) on the first batch.
    """
    torch.manual_seed(run.seed)
    model = build_model(
        run.scheme, run.layers, setup.width, setup.heads, setup.ffn_dim, setup.seq_len
    )
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam(parameters, lr=run.lr, betas=(0.9, 0.98), eps=1e-8)
    batches = torch.Generator().manual_seed(run.seed)
    valid = (data.valid_inputs, data.valid_targets, setup.batch_size)
    started = time.process_time()
    initial = evaluate(model, *valid)
    detector = DivergenceDetector(initial, setup.window, setup.patience)
    log_every = max(1, setup.steps // 20)
    curve, interval, grad_norms, first_update, reason, step = [], [], [], math.nan, None, 0
    for step in range(1, setup.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = run.lr * lr_factor(step, run.warmup, setup.steps)
        inputs, targets = random_windows(data.train, setup.batch_size, setup.seq_len, batches)
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, math.inf).item()  # no clipping
        grad_norms.append(grad_norm)
        interval.append(loss.item())
        reason = detector.update(loss.item(), grad_norm)
        if reason is not None:
            break
        optimizer.step()
        if step == 1:
            with torch.no_grad():
                before = logits.detach()
                first_update = ((model(inputs)[0] - before).norm() / before.norm()).item()
        if step % log_every == 0:
            curve.append([step, sum(interval) / len(interval)])
            interval = []
    final = evaluate(model, *valid)
    if reason is None and not final < initial:
        reason = f"final validation loss {final:.3f} not below the initial {initial:.3f}"
        detector.diverged_at = detector.above_since or setup.steps
    finite = [g for g in grad_norms if math.isfinite(g)]
    return {  # NaN/inf as None: the store is strict JSON
        "initial_loss": initial,
        "final_loss": final if math.isfinite(final) else None,
        "diverged": reason is not None,
        "diverged_step": detector.diverged_at,
        "reason": reason or "",
        "steps_done": step,
        "max_grad_norm": max(finite) if finite else None,
        "first_update": first_update if math.isfinite(first_update) else None,
        "train_curve": curve,
        "cpu_seconds": time.process_time() - started,
        "parameters": sum(p.numel() for p in parameters),
    }


def relative_update(
    scheme,
    layers,
    width=16,
    heads=2,
    ffn_dim=32,
    lr=1e-4,
    batch_size=4,
    seq_len=32,
    seed=0,
    dtype=torch.float64,
):
    """DeepNet's update size: ‖F(x; θ+Δθ) − F(x; θ)‖ / ‖F(x; θ)‖, Δθ one Adam step at init.

    F is the decoder's output (logits) on a fixed random batch x; Δθ is one step of Adam (no weight
    decay) on the next-token loss of that batch. Deterministic for a given seed. Adam's first step
    moves every parameter by about ``lr`` regardless of its gradient's scale, so the quantity
    measures how strongly the architecture amplifies a uniform-size parameter change.
    """
    torch.manual_seed(seed)
    model = build_model(scheme, layers, width, heads, ffn_dim, max_positions=seq_len).to(dtype)
    tokens = torch.randint(
        0, VOCAB_SIZE, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed)
    )
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    before, _ = model(inputs)
    F.cross_entropy(before.reshape(-1, before.size(-1)), targets.reshape(-1)).backward()
    torch.optim.Adam(model.parameters(), lr=lr).step()
    with torch.no_grad():
        after, _ = model(inputs)
    return ((after - before).norm() / before.norm()).item()


def update_sizes(schemes=SCHEMES, depths=(6, 24, 96), lr=1e-4, seeds=(0, 1, 2), **kwargs):
    """``relative_update`` averaged over seeds, for every (scheme, depth); kwargs go to it."""
    return {
        (scheme, depth): sum(
            relative_update(scheme, depth, lr=lr, seed=seed, **kwargs) for seed in seeds
        )
        / len(seeds)
        for scheme in schemes
        for depth in depths
    }


def measure_update(args):
    """Print DeepNet's update size at depths 6, 24, 96 (width 16) as a markdown table."""
    torch.set_num_threads(args.threads)
    depths, seeds = (6, 24, 96), (0, 1, 2)
    sizes = update_sizes(args.schemes, depths, lr=args.update_lr, seeds=seeds)
    print(
        f"Relative output change after one Adam step at init (lr {args.update_lr:g}; "
        f"width 16, 2 heads, FFN 32; batch 4x32 random bytes; float64; mean of seeds {seeds})\n"
    )
    print("| scheme | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---|" + "---:|" * len(depths))
    for scheme in args.schemes:
        print(
            f"| {LABELS[scheme]} | " + " | ".join(f"{sizes[scheme, d]:.4f}" for d in depths) + " |"
        )


# The full sweep and --quick. Sizing of the full sweep: docs in magneto.examples.sweep.
FULL = dict(
    depths=[8, 32, 128],
    lrs=[1e-4, 3.2e-4, 1e-3, 3.2e-3, 1e-2, 3.2e-2, 1e-1, 3.2e-1, 1.0],
    warmups=[0, 12],
    seeds=2,
    **vars(Setup()),
)
QUICK = dict(
    FULL,
    depths=[2, 8],
    lrs=[1e-3, 3.2e-2, 1.0],
    warmups=[0],
    seeds=2,
    width=32,
    heads=2,
    ffn_dim=64,
    seq_len=32,
    batch_size=4,
    steps=40,
    valid_windows=16,
    train_bytes=400_000,
    valid_bytes=40_000,
    patience=15,
)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without --quick the defaults are the full sweep's: "
        + ", ".join(f"{k}={v}" for k, v in FULL.items())
        + ". --quick: "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items() if FULL[k] != v)
        + ". Flags given explicitly override either.",
    )
    grid = p.add_argument_group("the grid")
    grid.add_argument("--quick", action="store_true", help="a small sweep (a few minutes; CI)")
    grid.add_argument(
        "--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES, help="norm schemes"
    )
    grid.add_argument("--depths", nargs="+", type=int, help="decoder layers, one panel each")
    grid.add_argument("--lrs", nargs="+", type=float, help="peak Adam learning rates")
    grid.add_argument("--warmups", nargs="+", type=int, help="warm-up lengths in steps (0: none)")
    grid.add_argument(
        "--seeds",
        type=int,
        help="seeds at each scheme's divergence edge (the first pass runs seed 0 only)",
    )
    model = p.add_argument_group("model, data and training (shared by every run)")
    model.add_argument("--width", type=int, help="model width (embed_dim)")
    model.add_argument("--heads", type=int, help="attention heads")
    model.add_argument("--ffn-dim", type=int, help="feed-forward hidden size")
    model.add_argument("--seq-len", type=int, help="bytes per training window")
    model.add_argument("--batch-size", type=int, help="windows per step")
    model.add_argument("--steps", type=int, help="optimizer steps per run")
    model.add_argument("--valid-windows", type=int, help="validation windows of --seq-len bytes")
    model.add_argument("--train-bytes", type=int, help="training split's byte budget")
    model.add_argument("--valid-bytes", type=int, help="validation split's byte budget")
    model.add_argument("--window", type=int, help="steps in the divergence rule's loss mean")
    model.add_argument(
        "--patience", type=int, help="steps above the initial loss that stop a run as diverged"
    )
    how = p.add_argument_group("running")
    how.add_argument("--jobs", type=int, default=2, help="runs in parallel (worker processes)")
    how.add_argument("--threads", type=int, default=1, help="torch CPU threads per job")
    how.add_argument(
        "--out-dir", default=str(DEFAULT_OUT_DIR), help="where the results go (default: ./results)"
    )
    how.add_argument(
        "--replot", action="store_true", help="redraw from --out-dir's runs without training"
    )
    how.add_argument(
        "--measure-update",
        action="store_true",
        help="print DeepNet's one-step update size at depths 6, 24, 96 instead of training",
    )
    how.add_argument(
        "--update-lr", type=float, default=1e-4, help="Adam learning rate of --measure-update"
    )
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    positive = ["jobs", "threads", "seeds", *(n for n in vars(Setup()) if n != "patience")]
    for name in positive + ["patience"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.depths) < 1 or min(args.warmups) < 0 or min(args.lrs) <= 0:
        p.error("--depths must be >= 1, --warmups >= 0 and --lrs > 0")
    if args.update_lr <= 0:
        p.error("--update-lr must be > 0")
    if max(args.warmups) >= args.steps:
        p.error("every --warmups value must be shorter than --steps")
    return args


def setup_of(args):
    return Setup(**{name: getattr(args, name) for name in vars(Setup())})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.measure_update:
        measure_update(args)
        return
    from magneto.examples import sweep

    # The command that makes these results: a --replot redraws what the command without it made.
    made_by = "".join(f" {a}" for a in argv if a != "--replot")
    sweep.main(args, "python -m magneto.examples.stability" + made_by)


if __name__ == "__main__":
    main()
