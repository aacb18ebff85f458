"""Does Magneto train where other norm schemes diverge? A deep, narrow byte-level LM on CPU.

Four decoder-only language models of equal size — Post-LN, Pre-LN, DeepNorm and Magneto (Sub-LN) —
are trained one after another with the same data order, seed, optimizer (Adam) and an aggressive
learning rate with no warm-up. The text is the Python standard library as installed (see
``magneto.examples.data``). A run whose loss or gradient norm turns NaN/inf, or whose recent mean
loss blows up, is stopped and recorded as diverged.

    python -m magneto.examples.stability                   # defaults: about 10 min on 2 cores
    python -m magneto.examples.stability --layers 96 --tokens 2000000 --out-dir /tmp/stab
    python -m magneto.examples.stability --measure-update  # DeepNet's one-step update size

Writes ``stability.png`` (train and validation loss per scheme), ``stability.md`` (a table) and
``stability.json`` (every number) into ``--out-dir`` (default ``./results``; the repository's
own run is in ``bench/results``, made with ``--out-dir bench/results``).

The mechanism behind the claim (DeepNet, Wang et al. 2022, §3): with Post-LN the change of the
model's output caused by one optimizer step at initialisation grows with depth, and a large early
update throws training into a bad region; DeepNorm and Magneto's initialisation bound it.
``relative_update`` measures that quantity, ‖F(x; θ+Δθ) − F(x; θ)‖ / ‖F(x; θ)‖ after one Adam step.
"""

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import magneto
from magneto.examples.data import VOCAB_SIZE, fixed_windows, load_corpus, random_windows

SCHEMES = ("post", "pre", "deepnorm", "subln")
LABELS = {"post": "Post-LN", "pre": "Pre-LN", "deepnorm": "DeepNorm", "subln": "Magneto (Sub-LN)"}
DEFAULT_OUT_DIR = Path("results")  # under the current directory


def build_model(scheme, layers, width, heads, ffn_dim, max_positions, vocab_size=VOCAB_SIZE):
    """A magneto decoder-only LM in the given norm scheme, with the paper's initialisation."""
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
        norm_scheme=scheme,
        init="paper",
        max_positions=max_positions,
    )
    return magneto.Decoder(config)


def lm_loss(model, inputs, targets):
    """Mean next-token cross-entropy (nats per byte)."""
    logits, _ = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


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


class DivergenceDetector:
    """Decides when a training run has diverged.

    A run diverges when its loss or gradient norm is NaN/inf, or when the mean loss of its last
    ``window`` steps exceeds ``blowup`` times a reference: the smaller of the first step's loss and
    the best (lowest) windowed mean seen so far. Single spikes that the run recovers from within a
    window are tolerated; a loss that climbs and stays up is not.
    """

    def __init__(self, blowup=2.0, window=10):
        if blowup <= 1.0:
            raise ValueError(f"blowup must be > 1, got {blowup}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.blowup = blowup
        self.window = window
        self._recent = []
        self._reference = math.inf

    def update(self, loss, grad_norm=0.0):
        """Feed one step's loss and gradient norm; returns the reason for divergence, or None."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        self._recent = (self._recent + [loss])[-self.window :]
        mean = sum(self._recent) / len(self._recent)
        if len(self._recent) == 1 and self._reference == math.inf:
            self._reference = loss
        if mean > self.blowup * self._reference:
            return (
                f"loss blew up: mean of last {len(self._recent)} steps {mean:.3f} "
                f"> {self.blowup} x {self._reference:.3f}"
            )
        if len(self._recent) == self.window:
            self._reference = min(self._reference, mean)
        return None


@dataclass
class RunResult:
    """Everything recorded about one scheme's run."""

    scheme: str
    train_tokens: list = field(default_factory=list)  # tokens seen after each step
    train_loss: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    valid_tokens: list = field(default_factory=list)
    valid_loss: list = field(default_factory=list)
    diverged: bool = False
    reason: str = ""
    train_seconds: float = 0.0
    parameters: int = 0

    @property
    def max_grad_norm(self):
        finite = [g for g in self.grad_norm if math.isfinite(g)]
        return max(finite) if finite else math.nan

    @property
    def tokens_per_second(self):
        return (
            self.train_tokens[-1] / self.train_seconds
            if self.train_tokens and self.train_seconds
            else math.nan
        )


def unigram_loss(train, targets):
    """Validation loss of the training bytes' frequencies (add-one smoothed), ignoring all context.

    A model at this loss has learnt nothing but how common each byte is; leaving it is the first
    sign that attention and depth are doing something.
    """
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1.0
    return -(counts / counts.sum()).log()[targets].mean().item()


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


def train_scheme(scheme, args, corpus, valid_batch):
    """Train one scheme from the shared seed; stops early (and records why) if it diverges."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model = build_model(
        scheme, args.layers, args.width, args.heads, args.ffn_dim, max_positions=args.seq_len
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    batches = torch.Generator().manual_seed(
        args.seed
    )  # the same batches, in the same order, for every scheme
    detector = DivergenceDetector(blowup=args.blowup, window=args.blowup_window)
    result = RunResult(scheme, parameters=sum(p.numel() for p in model.parameters()))
    tokens_per_step = args.batch_size * args.seq_len
    steps = max(1, args.tokens // tokens_per_step)

    result.valid_tokens.append(0)
    result.valid_loss.append(evaluate(model, *valid_batch, args.batch_size))
    bar = tqdm(
        range(1, steps + 1),
        desc=f"{LABELS[scheme]:>16}",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup) if args.warmup > 0 else args.lr
        inputs, targets = random_windows(corpus.train, args.batch_size, args.seq_len, batches)
        started = time.perf_counter()
        loss = lm_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), math.inf
        ).item()  # measure, no clipping
        reason = detector.update(loss.item(), grad_norm)
        if reason is None:
            optimizer.step()
        result.train_seconds += time.perf_counter() - started
        result.train_tokens.append(step * tokens_per_step)
        result.train_loss.append(loss.item())
        result.grad_norm.append(grad_norm)
        bar.set_postfix(loss=f"{loss.item():.3f}", gnorm=f"{grad_norm:.3g}")
        if reason is not None:
            result.diverged, result.reason = True, f"step {step}: {reason}"
            bar.write(f"{LABELS[scheme]} diverged at {result.reason}")
        if reason is not None or step % args.eval_every == 0 or step == steps:
            result.valid_tokens.append(step * tokens_per_step)
            result.valid_loss.append(evaluate(model, *valid_batch, args.batch_size))
        if reason is not None:
            break
    bar.close()
    return result


def plot(results, path, title, baseline):
    """Train (smoothed) and validation loss against tokens, one line per scheme; x marks divergence;
    the dashed line is the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    ceiling = 2.0 * math.log(VOCAB_SIZE)  # keep a blow-up from flattening the other curves
    for i, r in enumerate(results):
        color = f"C{i}"
        label = LABELS[r.scheme] + (" (diverged)" if r.diverged else "")
        smooth = [
            sum(r.train_loss[max(0, i - 9) : i + 1]) / len(r.train_loss[max(0, i - 9) : i + 1])
            for i in range(len(r.train_loss))
        ]
        ax_train.plot(r.train_tokens, r.train_loss, color=color, alpha=0.2, linewidth=0.8)
        ax_train.plot(r.train_tokens, smooth, color=color, label=label)
        ax_valid.plot(
            r.valid_tokens, r.valid_loss, color=color, marker="o", markersize=3, label=label
        )
        if r.diverged:
            last = r.train_loss[-1]
            ax_train.plot(
                r.train_tokens[-1],
                min(last, ceiling) if math.isfinite(last) else ceiling,
                "x",
                color=color,
                markersize=10,
                markeredgewidth=2,
            )
    for ax, name in (
        (ax_train, "train loss (10-step mean; raw faint)"),
        (ax_valid, "validation loss"),
    ):
        ax.axhline(
            baseline,
            color="gray",
            linestyle="--",
            linewidth=1,
            label="unigram baseline (no context)",
        )
        ax.set_xlabel("training tokens")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.set_ylim(top=ceiling)
    ax_train.set_ylabel("cross-entropy (nats per byte)")
    ax_valid.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results):
    """Markdown table of the runs."""
    rows = [
        "| scheme | final validation loss | diverged | largest gradient norm | tokens/s |",
        "|---|---:|---|---:|---:|",
    ]
    for r in results:
        diverged = f"yes ({r.reason})" if r.diverged else "no"
        rows.append(
            f"| {LABELS[r.scheme]} | {r.valid_loss[-1]:.3f} | {diverged} | {r.max_grad_norm:.3g} "
            f"| {r.tokens_per_second:.0f} |"
        )
    return "\n".join(rows)


def describe(args):
    """One line stating the setup, for the plot title and the table header."""
    return (
        f"{args.layers} layers, width {args.width}, {args.heads} heads, FFN {args.ffn_dim}; "
        f"Adam lr {args.lr:g}, warm-up {args.warmup} steps; "
        f"batch {args.batch_size}x{args.seq_len} bytes; "
        f"{args.tokens:,} tokens per scheme; seed {args.seed}"
    )


def command_line(argv):
    return "python -m magneto.examples.stability" + "".join(f" {a}" for a in argv)


def load_data(args):
    """The corpus, the fixed validation windows and the unigram baseline on them."""
    corpus = load_corpus(train_bytes=args.train_bytes, valid_bytes=args.valid_bytes)
    valid_batch = fixed_windows(corpus.valid, args.valid_windows, args.seq_len)
    return corpus, valid_batch, unigram_loss(corpus.train, valid_batch[1])


def write_outputs(results, args, command, environment, baseline):
    """stability.png, stability.md and stability.json in args.out_dir."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = describe(args)
    plot(results, out / "stability.png", f"{setup}\n{command}", baseline)
    parameters = ", ".join(f"{LABELS[r.scheme]} {r.parameters:,}" for r in results)
    text = (
        f"# Training stability: four norm schemes\n\n`{command}`\n\n{setup}. {environment}. "
        f"Parameters per model: {parameters}.\n\n"
        f"{table(results)}\n\nUnigram baseline (byte frequencies of the training split, "
        f"no context) on the same validation windows: {baseline:.3f}. A diverged run's "
        f"validation loss is taken where it stopped.\n\n![loss curves](stability.png)\n"
    )
    (out / "stability.md").write_text(text)
    record = {
        "command": command,
        "setup": setup,
        "environment": environment,
        "unigram_baseline": baseline,
        "args": vars(args),
        "runs": [
            dict(asdict(r), max_grad_norm=r.max_grad_norm, tokens_per_second=r.tokens_per_second)
            for r in results
        ],
    }
    (out / "stability.json").write_text(json.dumps(record, indent=1))
    print(table(results))
    print(f"wrote {out / 'stability.png'}, {out / 'stability.md'}, {out / 'stability.json'}")


def run(args, argv):
    torch.set_num_threads(args.threads)
    corpus, valid_batch, baseline = load_data(args)
    print(
        f"corpus: {corpus.train.numel():,} train bytes from {len(corpus.train_files)} files, "
        f"{corpus.valid.numel():,} validation bytes from {len(corpus.valid_files)} other files",
        file=sys.stderr,
    )
    results = [train_scheme(scheme, args, corpus, valid_batch) for scheme in args.schemes]
    environment = (
        f"Python {platform.python_version()} stdlib, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}"
    )
    write_outputs(results, args, command_line(argv), environment, baseline)


def replot(out_dir):
    """Redraw the plot and table from a saved stability.json (no training)."""
    record = json.loads((Path(out_dir) / "stability.json").read_text())
    args = argparse.Namespace(**{**record["args"], "out_dir": str(out_dir)})
    fields = {f for f in RunResult.__dataclass_fields__}
    results = [RunResult(**{k: v for k, v in run.items() if k in fields}) for run in record["runs"]]
    write_outputs(results, args, record["command"], record["environment"], load_data(args)[2])


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
        f"width 16, 2 heads, "
        f"FFN 32; batch 4x32 random bytes; float64; mean of seeds {seeds})\n"
    )
    print("| scheme | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---|" + "---:|" * len(depths))
    for scheme in args.schemes:
        print(
            f"| {LABELS[scheme]} | " + " | ".join(f"{sizes[scheme, d]:.4f}" for d in depths) + " |"
        )


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layers", type=int, default=48, help="decoder layers (depth)")
    p.add_argument("--width", type=int, default=128, help="model width (embed_dim)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ffn-dim", type=int, default=512, help="feed-forward hidden size")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per training window")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--tokens", type=int, default=256_000, help="training tokens (bytes) per scheme")
    p.add_argument(
        "--lr", type=float, default=2e-3, help="Adam learning rate (aggressive on purpose)"
    )
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (0: none)")
    p.add_argument(
        "--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES, help="norm schemes to run"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the init and of the batch order")
    p.add_argument(
        "--eval-every", type=int, default=10, help="steps between validation evaluations"
    )
    p.add_argument(
        "--valid-windows", type=int, default=32, help="validation windows of --seq-len bytes"
    )
    p.add_argument("--train-bytes", type=int, default=4_000_000)
    p.add_argument("--valid-bytes", type=int, default=400_000)
    p.add_argument(
        "--blowup", type=float, default=2.0, help="divergence: windowed loss > blowup x best"
    )
    p.add_argument("--blowup-window", type=int, default=10, help="steps in the divergence window")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--out-dir", default=str(DEFAULT_OUT_DIR), help="where the results go (default: ./results)"
    )
    p.add_argument(
        "--measure-update",
        action="store_true",
        help="print DeepNet's one-step update size at depths 6, 24, 96 instead of training",
    )
    p.add_argument(
        "--update-lr", type=float, default=1e-4, help="Adam learning rate of --measure-update"
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="redraw stability.png/.md from --out-dir's stability.json instead of training",
    )
    args = p.parse_args(argv)
    for name in (
        "layers",
        "width",
        "heads",
        "ffn_dim",
        "seq_len",
        "batch_size",
        "tokens",
        "eval_every",
        "valid_windows",
        "threads",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.update_lr <= 0:
        p.error("--lr and --update-lr must be > 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.measure_update:
        measure_update(args)
    elif args.replot:
        replot(args.out_dir)
    else:
        run(args, argv)


if __name__ == "__main__":
    main()
