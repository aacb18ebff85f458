"""Speed: each op and one Sub-LN encoder and decoder layer, side by side, with their floors.

A **case** is one thing timed at one size in one pass (training forward, forward+backward, or
a ``no_grad`` decoding step): its variants run in the same interleaved rounds
(``harness.interleaved``), and every ratio is ``time(magneto backend) / time(variant)`` per
round. Variants, by name:

- ``magneto <backend>``: the subjects (the fused backends);
- ``eager reference``: the same op or model on ``backend="reference"`` (plain PyTorch);
- ``torchscale``: torchscale 0.3.0's layer, same weights (layers only);
- ``torch.compile(reference)``: inductor's compilation of the eager reference, compiled and
  warmed up before the rounds (compile time is reported, never timed);
- on a GPU, Liger-Kernel's and flash-attn's LayerNorm where importable;
- floors: what the case cannot do without. For ``ln_linear`` and the layers, their GEMMs alone
  (ready-made operands; the forward and the weight gradient into new tensors, the input
  gradient into a given one, as the ``cpu`` backend runs them) plus, for the layers, the
  attention core (``magneto.attention_core.attend``, as our layers run it: the fastest of its
  paths on this CPU), through the GEMM engine the ``cpu`` backend uses (``_C._cpu_gemm``, per
  GEMM role: the fastest of MKL, oneDNN and, in bf16, MKL on float32 copies, as measured on
  this CPU, so a faster engine does not pass for a fusion win) and through ``torch.mm``; for
  the memory-bound norm ops, the bytes an ideal kernel moves, at the copy bandwidth measured in
  the same rounds (``y.copy_(x)`` on a tensor of x's size).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

import magneto_kernels as mk
from magneto import attention_core
from magneto.report import harness
from magneto.report.models import layer_call, twins

REFERENCE = "eager reference"
TORCHSCALE = "torchscale"
COMPILED = "torch.compile(reference)"
COPY = "copy"  # timed only to derive the bandwidth floor
FLOOR_BYTES = "floor: bytes at copy bandwidth"
FLOOR_ENGINE = "floor: same GEMM engine"
FLOOR_MM = "floor: torch.mm"


def subject(backend: str) -> str:
    return f"magneto {backend}"


@dataclasses.dataclass
class Sizes:
    d: int
    heads: int
    ffn: int
    batch: int
    tokens: int
    decode_rows: tuple[int, ...]
    context: int

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


@dataclasses.dataclass
class Case:
    """Variants timed together; ``floors``: variants that bound the subjects from below;
    ``copy_passes``: the tensor passes of x's size an ideal kernel moves (bandwidth floor);
    ``flops``: for the achieved TFLOP/s."""

    group: str
    name: str
    pass_: str
    variants: dict[str, Callable[[], object]]
    subjects: list[str]
    floors: list[str] = dataclasses.field(default_factory=list)
    copy_passes: float = 0.0
    copy_bytes: int = 0
    flops: float = 0.0
    compile_s: Optional[float] = None


@dataclasses.dataclass
class Settings:
    device: str
    dtype: torch.dtype
    backends: list[str]
    compile: bool
    rounds: int
    timer: harness.Timer
    comparators_missing: dict[str, str] = dataclasses.field(default_factory=dict)


CASE_BUDGET_S = 60.0
"""Wall seconds of rounds after which a case starts no more (once ``harness.interleaved``'s
three ran): where torch's bf16 GEMMs are generic loops (CPUs without bf16 arithmetic), one
round of a layer's comparators takes over a minute, and 15 of them per case made the bf16
report an hour long."""


def _randn(*shape, s: Settings, mean=0.0, std=1.0, grad=False):
    t = torch.randn(*shape, device=s.device, dtype=torch.float32) * std + mean
    return t.to(s.dtype).requires_grad_(grad)


def _fwd_bwd(call: Callable[[], torch.Tensor], dy: torch.Tensor, leaves) -> Callable[[], None]:
    def run():
        call().backward(dy)
        for t in leaves:
            t.grad = None

    return run


def _first_calls(variant: Callable[[], object]) -> float:
    """Seconds of a torch.compile variant's first two calls, in which it compiles (forward on
    the first, backward on the first backward), so that the timed rounds find it compiled.

    Only the computation is compiled, never a variant's wrapper: a wrapper that drops its
    result would let inductor eliminate the whole computation as dead code."""
    start = time.perf_counter()
    variant()
    variant()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# GEMM and attention floors


def _mm_engines(device: str) -> dict[str, Callable]:
    """The floors' GEMM engines: on CPU the cpu backend's own and torch.mm; on a GPU torch.mm
    (cuBLAS, which the cuda backend calls)."""

    def aten(a, b, out, role):
        torch.mm(a, b) if out is None else torch.mm(a, b, out=out)

    engines = {FLOOR_MM: aten}
    if device == "cpu":
        from magneto_kernels import _C

        def ours(a, b, out, role):
            _C._cpu_gemm(a, b, out, False, role)

        engines = {FLOOR_ENGINE: ours, FLOOR_MM: aten}
    return engines


def _gemms(
    shapes: list[tuple[int, int]], rows: int, backward: bool, mm: Callable, s: Settings
) -> Callable[[], None]:
    """The GEMMs of linear layers (in_features, out_features) at ``rows``: forward
    ``h @ W^T``; backward also ``dz @ W`` and ``dz^T @ h``. The forward and the weight gradient
    go to new tensors and the input gradient into a given one, as the cpu backend's do (oneDNN
    returns a new tensor: into a given one it pays a copy)."""
    operands = [(_randn(rows, k, s=s), _randn(n, k, s=s), _randn(rows, n, s=s)) for k, n in shapes]

    def run():
        for h, w, dz in operands:
            n, k = w.shape
            mm(h, w.t(), None, "forward")
            if backward:
                mm(dz, w, torch.empty(rows, k, device=s.device, dtype=s.dtype), "input_grad")
                mm(dz.t(), h, None, "weight_grad")

    return run


def _attention(
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    head_dim: int,
    causal: bool,
    backward: bool,
    s: Settings,
) -> Callable[[], None]:
    q = _randn(batch, heads, queries, head_dim, s=s, grad=backward)
    k = _randn(batch, heads, keys, head_dim, s=s, grad=backward)
    v = _randn(batch, heads, keys, head_dim, s=s, grad=backward)
    do = _randn(batch, heads, queries, head_dim, s=s)

    def run():
        out = attention_core.attend(q, k, v, causal=causal)
        if backward:
            out.backward(do)
            q.grad = k.grad = v.grad = None

    return run


def _floors(
    shapes, rows: int, backward: bool, s: Settings, attention: Optional[Callable[[], None]] = None
) -> dict[str, Callable[[], None]]:
    floors = {}
    for name, mm in _mm_engines(s.device).items():
        gemms = _gemms(shapes, rows, backward, mm, s)
        if attention is None:
            floors[name] = gemms
        else:

            def both(gemms=gemms):
                gemms()
                attention()

            floors[name] = both
    return floors


# ------------------------------------------------------------------------------------------
# Ops


def _gpu_layer_norms(s: Settings, x, w, b) -> dict[str, Callable[[], torch.Tensor]]:
    """Other libraries' LayerNorm kernels, where importable (recorded as missing otherwise)."""
    found = {}
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        found["Liger-Kernel LayerNorm"] = lambda: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    except ImportError as err:
        s.comparators_missing["Liger-Kernel LayerNorm"] = str(err)
    try:
        from flash_attn.ops.triton.layer_norm import layer_norm_fn

        found["flash-attn LayerNorm"] = lambda: layer_norm_fn(x, w, b, eps=1e-5)
    except ImportError as err:
        s.comparators_missing["flash-attn LayerNorm"] = str(err)
    return found


def _norm_cases(sz: Sizes, s: Settings) -> list[Case]:
    rows, d = sz.rows, sz.d
    x = _randn(rows, d, s=s, mean=1.0, std=2.0, grad=True)
    residual = _randn(rows, d, s=s, grad=True)
    w = _randn(d, s=s, mean=1.0, std=0.2, grad=True)
    b = _randn(d, s=s, std=0.1, grad=True)
    dy = _randn(rows, d, s=s)
    copy_dst = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    calls = {
        # op: (call on a backend, leaves, tensor passes: forward, forward+backward)
        "layer_norm": (lambda be: mk.layer_norm(x, w, b, backend=be), (x, w, b), (2, 5)),
        "add_layer_norm": (
            lambda be: mk.add_layer_norm(x, residual, w, b, backend=be)[0],
            (x, residual, w, b),
            (4, 8),
        ),
    }
    cases = []
    for op, (call, leaves, passes) in calls.items():
        others = _gpu_layer_norms(s, x, w, b) if op == "layer_norm" and s.device == "cuda" else {}
        for pass_, n_passes in zip(("fwd", "fwd+bwd"), passes):

            def wrap(c, p=pass_, lv=leaves):
                return c if p == "fwd" else _fwd_bwd(c, dy, lv)

            variants = {subject(be): wrap(lambda be=be, call=call: call(be)) for be in s.backends}
            variants[REFERENCE] = wrap(lambda call=call: call("reference"))
            variants.update({name: wrap(c) for name, c in others.items()})
            case = Case(
                "ops",
                f"{op} {rows}×{d}",
                pass_,
                variants,
                list(s.backends),
                floors=[FLOOR_BYTES],
                copy_passes=n_passes,
                copy_bytes=nbytes,
            )
            if s.compile:
                variants[COMPILED] = wrap(torch.compile(lambda call=call: call("reference")))
                case.compile_s = _first_calls(variants[COMPILED])
            variants[COPY] = lambda: copy_dst.copy_(x)
            cases.append(case)
    return cases


def _ln_linear_cases(
    sz: Sizes, s: Settings, rows: int, passes: tuple[str, ...], group: str
) -> list[Case]:
    """fc1 (d → ffn: LN, bias) and fc2 (ffn → d: gelu input activation, LN, bias, residual)."""
    cases = []
    for label, k, n, fc2 in (("fc1", sz.d, sz.ffn, False), ("fc2", sz.ffn, sz.d, True)):
        grad = passes != ("no_grad",)
        x = _randn(rows, k, s=s, mean=0.5, grad=grad)
        lw = _randn(k, s=s, mean=1.0, std=0.2, grad=grad)
        lb = _randn(k, s=s, std=0.1, grad=grad)
        w = _randn(n, k, s=s, std=k**-0.5, grad=grad)
        bias = _randn(n, s=s, std=0.1, grad=grad)
        residual = _randn(rows, n, s=s) if fc2 else None
        dy = _randn(rows, n, s=s)
        options = dict(input_activation="gelu" if fc2 else None, residual=residual)
        leaves = (x, lw, lb, w, bias)

        def call(be, options=options, leaves=leaves):
            return mk.ln_linear(*leaves, backend=be, **options)

        for pass_ in passes:
            backward = pass_ == "fwd+bwd"

            def wrap(c, pass_=pass_, dy=dy, leaves=leaves):
                if pass_ == "fwd+bwd":
                    return _fwd_bwd(c, dy, leaves)
                if pass_ == "no_grad":
                    return lambda: _no_grad(c)
                return c

            variants = {subject(be): wrap(lambda be=be, call=call: call(be)) for be in s.backends}
            variants[REFERENCE] = wrap(lambda call=call: call("reference"))
            floors = _floors([(k, n)], rows, backward, s)
            case = Case(
                group,
                f"ln_linear {label} M={rows} K={k} N={n}",
                pass_,
                variants,
                list(s.backends),
                floors=list(floors),
                flops=2.0 * rows * k * n * (3 if backward else 1),
            )
            if s.compile:
                variants[COMPILED] = wrap(torch.compile(lambda call=call: call("reference")))
                case.compile_s = _first_calls(variants[COMPILED])
            variants.update(floors)
            cases.append(case)
    return cases


def _no_grad(fn: Callable[[], object]) -> None:
    with torch.no_grad():
        fn()


def op_cases(sz: Sizes, s: Settings) -> list[Case]:
    return _norm_cases(sz, s) + _ln_linear_cases(sz, s, sz.rows, ("fwd", "fwd+bwd"), "ops")


# ------------------------------------------------------------------------------------------
# Layers


def _layer_shapes(sz: Sizes) -> list[tuple[int, int]]:
    """(in, out) of a Sub-LN layer's linear maps: packed q/k/v, out_proj, fc1, fc2."""
    return [(sz.d, 3 * sz.d), (sz.d, sz.d), (sz.d, sz.ffn), (sz.ffn, sz.d)]


def _models(kind: str, sz: Sizes, s: Settings):
    theirs, ours = twins(
        kind, sz.d, sz.heads, sz.ffn, [*s.backends, "reference"], s.device, s.dtype
    )
    return theirs.layers[0], {be: m.layers[0] for be, m in ours.items()}


def layer_cases(sz: Sizes, s: Settings) -> list[Case]:
    """One encoder layer and one decoder-only layer, training forward and forward+backward."""
    cases = []
    for kind in ("encoder", "decoder"):
        theirs, ours = _models(kind, sz, s)
        for layer in (theirs, *ours.values()):
            layer.train()
        x = _randn(sz.batch, sz.tokens, sz.d, s=s, grad=True)
        dy = _randn(sz.batch, sz.tokens, sz.d, s=s)
        compiled = torch.compile(ours["reference"]) if s.compile else None
        for pass_ in ("fwd", "fwd+bwd"):
            backward = pass_ == "fwd+bwd"

            def wrap(layer, is_ts=False, backward=backward, kind=kind, x=x, dy=dy):
                def call():
                    return layer_call(layer, kind, x, is_ts)

                if not backward:
                    return call

                def run():
                    call().backward(dy)
                    layer.zero_grad(set_to_none=True)
                    x.grad = None

                return run

            variants = {subject(be): wrap(ours[be]) for be in s.backends}
            variants[REFERENCE] = wrap(ours["reference"])
            variants[TORCHSCALE] = wrap(theirs, True)
            head_dim = sz.d // sz.heads
            attention = _attention(
                sz.batch, sz.heads, sz.tokens, sz.tokens, head_dim, kind == "decoder", backward, s
            )
            floors = _floors(_layer_shapes(sz), sz.rows, backward, s, attention)
            case = Case(
                "layers",
                f"{kind} layer {sz.batch}×{sz.tokens} tokens",
                pass_,
                variants,
                list(s.backends),
                floors=list(floors),
                flops=_layer_flops(sz, kind) * (3 if backward else 1),
            )
            if s.compile:
                variants[COMPILED] = wrap(compiled)
                case.compile_s = _first_calls(variants[COMPILED])
            variants.update(floors)
            cases.append(case)
    return cases


def _layer_flops(sz: Sizes, kind: str) -> float:
    gemm = sum(2.0 * sz.rows * k * n for k, n in _layer_shapes(sz))
    attention = 4.0 * sz.rows * sz.tokens * sz.d  # QK^T and PV
    return gemm + (attention / 2 if kind == "decoder" else attention)


def decode_cases(sz: Sizes, s: Settings) -> list[Case]:
    """One decoder layer's ``no_grad`` step for ``rows`` sequences of one new token each, over
    ``context`` cached keys/values (a fresh cache dict per call, so it does not grow), and
    ``ln_linear`` at those rows."""
    theirs, ours = _models("decoder", sz, s)
    for layer in (theirs, *ours.values()):
        layer.eval()
    compiled = torch.compile(ours["reference"]) if s.compile else None
    head_dim = sz.d // sz.heads
    cases = []
    for rows in sz.decode_rows:
        x = _randn(rows, 1, sz.d, s=s)
        key = _randn(rows, sz.heads, sz.context, head_dim, s=s)
        value = _randn(rows, sz.heads, sz.context, head_dim, s=s)

        def step(layer, is_ts=False, x=x, key=key, value=value):
            def run():
                with torch.no_grad():
                    layer_call(
                        layer,
                        "decoder",
                        x,
                        is_ts,
                        incremental_state={"prev_key": key, "prev_value": value},
                    )

            return run

        variants = {subject(be): step(ours[be]) for be in s.backends}
        variants[REFERENCE] = step(ours["reference"])
        variants[TORCHSCALE] = step(theirs, True)
        attention = _attention(rows, sz.heads, 1, sz.context + 1, head_dim, False, False, s)
        floors = _floors(_layer_shapes(sz), rows, False, s, lambda a=attention: _no_grad(a))
        case = Case(
            "decode",
            f"decoder layer step, {rows} rows, {sz.context} cached",
            "no_grad",
            variants,
            list(s.backends),
            floors=list(floors),
        )
        if s.compile:
            variants[COMPILED] = step(compiled)
            case.compile_s = _first_calls(variants[COMPILED])
        variants.update(floors)
        cases.append(case)
        cases += _ln_linear_cases(sz, s, rows, ("no_grad",), "decode")
    return cases


# ------------------------------------------------------------------------------------------


def measure(case: Case, s: Settings, tick: Callable[[], None] = lambda: None) -> dict:
    """Time ``case`` in interleaved rounds; its JSON record."""
    times = harness.interleaved(case.variants, s.rounds, s.timer, tick=tick, budget_s=CASE_BUDGET_S)
    rounds = len(next(iter(times.values())))
    if case.copy_passes:  # the bandwidth floor, derived per round from the copy's time
        times[FLOOR_BYTES] = [t * case.copy_passes / 2 for t in times.pop(COPY)]
    comparators = [v for v in times if v not in map(subject, case.subjects)]
    record = {
        "group": case.group,
        "case": case.name,
        "pass": case.pass_,
        "times": {v: harness.time_stats(t) for v, t in times.items()},
        "ratios": {
            be: {
                v: harness.ratio_stats(times[subject(be)], times[v]).as_dict() for v in comparators
            }
            for be in case.subjects
        },
        "floors": case.floors,
        "compile_s": case.compile_s,
        "rounds": rounds,
    }
    achieved = {}
    for be in case.subjects:
        seconds = record["times"][subject(be)]["median_s"]
        if case.copy_passes:
            achieved[be] = {"GB/s": case.copy_passes * case.copy_bytes / seconds / 1e9}
        elif case.flops:
            achieved[be] = {"TFLOP/s": case.flops / seconds / 1e12}
    record["achieved"] = achieved
    return record
