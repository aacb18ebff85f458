"""Per-call overhead of the public ops over the op they call, at decode sizes, on CPU.

For ``ln_linear``, ``layer_norm`` and ``add_layer_norm`` at 1 and 8 rows of width 768 (ln_linear
768→768 and 768→2304) and at 1 row of width 64, fp32, one thread, each timed per call as:

- ops:    the family's ``torch.ops.magneto.<op>_<family>`` op on the ready (rows, cols) matrix;
- raw:    the same op through the extension's typed call (``_C.call_<op>_native``), which the
          public function uses for the cpu backend: the kernel call with nothing around it;
- public: ``magneto_kernels.<op>`` on x of shape (1, rows, cols), as the modules pass it
          (checks, backend choice and the call included), with ``backend=None``
          so the ``MAGNETO_BACKEND`` lookup and the default order are timed too;
- 2-D:    the same public call on the (rows, cols) matrix;
- eager:  ``F.layer_norm`` (after the add, for add_layer_norm) and ``F.linear``.

Each under ``torch.no_grad()`` and with the parameters requiring grad (a training forward: the
op records its backward). The overhead column is public − raw, the number the public API adds.

Timed back to back, a kernel that streams a 768×768 weight slows down by more than the Python
run between its calls costs on its own (measured here: a 0.6 µs ``os.environ.get`` adds ~5 µs to
a 1×768→768 ln_linear), so the decode-size overheads include that effect; the 1×64 rows, whose
kernels touch little memory, show what the public path itself costs.

The machine may be shared and noisy: every round times each variant once (many calls each),
interleaved, the clock is the process's CPU time (``time.process_time``, one thread, so other
processes' load does not inflate it), and the table gives medians over rounds, the overhead
as the median of per-round differences. Times the ``magneto_kernels`` that Python imports: run
it from the checkout to time (``python -m bench.bench_overhead`` puts the working directory
first on the path).

``--gemm`` times instead the forward GEMM alone at 1-32 rows (the raw op with no norm and no
activation, i.e. the cpu backend's ``gemm::linear``: in fp32 the few-row kernel up to 16 rows,
in bf16/fp16 the engine measurement's choice, where the kernel is a candidate) against
``torch.addmm`` on the same tensors, as the median over rounds of the per-round time ratio, for
the decode shapes K×N = 768×2304, 768×3072, 3072×768 (csrc/cpu/gemm.h quotes it).

``--gemm --engines`` times each engine pinned (the few-row kernel's three bf16 variants, oneDNN)
against ``torch.addmm`` at 1-16 rows, and names the engine the measured choice then picks
("unmeasured" where the op runs the few-row kernel without measuring).

    python -m bench.bench_overhead [--rounds 15] [--sample-ms 20] [--gemm [--engines] [--dtype D]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import magneto_kernels as mk
from magneto.report import harness
from magneto_kernels import _C
from magneto_kernels.backends import FAMILY
from magneto_kernels.library import get_op

EPS = 1e-5
SIZES = ((1, 768, 768), (8, 768, 2304), (1, 64, 64))  # rows, in_features, out_features


def cases(rows: int, width: int, out_features: int, grad: bool) -> dict[str, dict]:
    """Per op: the variants' callables, on tensors made once."""
    gen = torch.Generator().manual_seed(0)

    def param(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    x = torch.randn(1, rows, width, generator=gen)
    x2 = x.view(rows, width)
    res = torch.randn(1, rows, width, generator=gen)
    res2 = res.view(rows, width)
    g, b = param(width), param(width)
    w, wb = param(out_features, width), param(out_features)
    family = FAMILY["cpu"]
    ln, add_ln, lin = (get_op(op, family) for op in ("layer_norm", "add_layer_norm", "ln_linear"))
    return {
        "ln_linear": {
            "ops": lambda: ln_linear_raw(lin, x2, g, b, w, wb),
            "raw": lambda: ln_linear_raw(_C.call_ln_linear_native, x2, g, b, w, wb),
            "public": lambda: mk.ln_linear(x, g, b, w, wb),
            "public_2d": lambda: mk.ln_linear(x2, g, b, w, wb),
            "eager": lambda: F.linear(F.layer_norm(x, (width,), g, b, EPS), w, wb),
        },
        "layer_norm": {
            "ops": lambda: ln(x2, g, b, EPS, "layer"),
            "raw": lambda: _C.call_layer_norm_native(x2, g, b, EPS, "layer"),
            "public": lambda: mk.layer_norm(x, g, b, EPS),
            "public_2d": lambda: mk.layer_norm(x2, g, b, EPS),
            "eager": lambda: F.layer_norm(x, (width,), g, b, EPS),
        },
        "add_layer_norm": {
            "ops": lambda: add_ln(x2, res2, g, b, EPS, 1.0, "layer"),
            "raw": lambda: _C.call_add_layer_norm_native(x2, res2, g, b, EPS, 1.0, "layer"),
            "public": lambda: mk.add_layer_norm(x, res, g, b, EPS),
            "public_2d": lambda: mk.add_layer_norm(x2, res2, g, b, EPS),
            "eager": lambda: F.layer_norm(res + x, (width,), g, b, EPS),
        },
    }


def ln_linear_raw(op, x, g, b, w, wb):
    # the schema's arguments in order (magneto::ln_linear_native), none of the optional ones set
    return op(
        x, g, b, w, wb, None, None, EPS, "layer", "none", "none", 1.0, 0.0, "none", *[None] * 4
    )


def per_call_us(fn, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def measure(variants: dict, rounds: int, sample_ms: float) -> dict[str, float]:
    for fn in variants.values():  # warm up, and size a sample to about sample_ms
        per_call_us(fn, 20)
    slowest = max(per_call_us(fn, 50) for fn in variants.values())
    calls = max(20, int(sample_ms * 1e3 / slowest))
    samples = [
        {name: per_call_us(fn, calls) for name, fn in variants.items()} for _ in range(rounds)
    ]
    result = {name: statistics.median(s[name] for s in samples) for name in variants}
    result["overhead"] = statistics.median(s["public"] - s["raw"] for s in samples)
    result["spread"] = max(s["public"] - s["raw"] for s in samples) - min(
        s["public"] - s["raw"] for s in samples
    )
    return result


GEMM_ROWS = (1, 2, 4, 8, 16, 32)
GEMM_SHAPES = ((768, 2304), (768, 3072), (3072, 768))  # K, N


def gemm_table(rounds: int, sample_ms: float, dtype: torch.dtype) -> None:
    """time(cpu backend's forward GEMM) / time(torch.addmm), per rows and shape, in dtype."""
    lin = get_op("ln_linear", FAMILY["cpu"])
    gen = torch.Generator().manual_seed(0)
    print("| rows | " + " | ".join(f"K={k} N={n}" for k, n in GEMM_SHAPES) + " |")
    print("|---:|" + "---:|" * len(GEMM_SHAPES))
    # unit-variance outputs (weights scaled by k^-1/2): the tolerance below is for values ~1
    weights = [
        (
            (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype),
            torch.randn(n, generator=gen).to(dtype),
        )
        for k, n in GEMM_SHAPES
    ]
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
    for rows in GEMM_ROWS:
        cells = []
        for w, wb in weights:
            x = torch.randn(rows, w.shape[1], generator=gen).to(dtype)
            variants = {
                "ours": lambda x=x, w=w, wb=wb: lin(
                    x, None, None, w, wb, None, None, EPS, "none", "none", "none", 1.0, 0.0
                ),
                "addmm": lambda x=x, w=w, wb=wb: torch.addmm(wb, x, w.t()),
            }
            torch.testing.assert_close(variants["ours"]()[0], variants["addmm"](), **tol)
            calls = max(5, int(sample_ms * 1e3 / per_call_us(variants["addmm"], 5)))
            samples = {
                name: (lambda fn=fn: [fn() for _ in range(calls)]) for name, fn in variants.items()
            }
            times = harness.interleaved(samples, rounds, harness.cpu_timer(1), warmup=1)
            r = harness.ratio_stats(times["ours"], times["addmm"])
            cells.append(f"{r.median:.2f} ({r.lo:.2f}–{r.hi:.2f})")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


def engine_table(rounds: int, sample_ms: float, dtype: torch.dtype) -> None:
    """Each engine of the forward GEMM pinned (csrc/cpu/gemm.h's policies; the few-row kernel on
    AMX-BF16 tiles, MAGNETO_CPU_AMX=0 on AVX512-BF16 dot products, and also
    MAGNETO_CPU_BF16_DOT=0 on float32 FMAs), time / torch.addmm's,
    per rows and shape, interleaved in one process, and the engine the measurement (auto) then
    picks."""
    lin = get_op("ln_linear", FAMILY["cpu"])
    gen = torch.Generator().manual_seed(0)

    def pinned(policy, amx, bf16_dot, x, w, wb):
        def run():
            os.environ["MAGNETO_CPU_AMX"], os.environ["MAGNETO_CPU_BF16_DOT"] = amx, bf16_dot
            _C._set_cpu_gemm_policy(policy)
            return lin(x, None, None, w, wb, None, None, EPS, "none", "none", "none", 1.0, 0.0)

        return run

    engines = {"few-row amx": ("few_rows", "1", "1"), "few-row dot": ("few_rows", "0", "1")}
    engines |= {"few-row fma": ("few_rows", "0", "0"), "onednn": ("onednn", "1", "1")}
    print("| rows | K×N | " + " | ".join(engines) + " | auto's choice |")
    print("|---:|---|" + "---:|" * len(engines) + "---|")
    for rows in GEMM_ROWS[:-1]:
        for k, n in GEMM_SHAPES:
            w, wb = torch.randn(n, k, generator=gen).to(dtype), torch.randn(n, generator=gen)
            x, wb = torch.randn(rows, k, generator=gen).to(dtype), wb.to(dtype)
            variants = {name: pinned(*e, x, w, wb) for name, e in engines.items()}
            variants["addmm"] = lambda x=x, w=w, wb=wb: torch.addmm(wb, x, w.t())
            calls = max(5, int(sample_ms * 1e3 / per_call_us(variants["addmm"], 5)))
            samples = {
                name: (lambda fn=fn: [fn() for _ in range(calls)]) for name, fn in variants.items()
            }
            times = harness.interleaved(samples, rounds, harness.cpu_timer(1), warmup=1)
            cells = []
            for name in engines:
                r = harness.ratio_stats(times[name], times["addmm"])
                cells.append(f"{r.median:.2f} ({r.lo:.2f}–{r.hi:.2f})")
            pinned("auto", "1", "1", x, w, wb)()  # measures afresh: policies forget their choices
            # the last choice the measurement made, if this call was measured
            last = _C.cpu_gemm_engine().rsplit("; ", 1)[-1]
            chosen = last.rsplit(": ", 1)[-1] if last.startswith("forward") else "unmeasured"
            print(f"| {rows} | {k}×{n} | " + " | ".join(cells) + f" | {chosen} |", flush=True)
    os.environ.pop("MAGNETO_CPU_AMX"), os.environ.pop("MAGNETO_CPU_BF16_DOT")
    _C._set_cpu_gemm_policy(os.environ.get("MAGNETO_CPU_GEMM", "auto"))


def revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(mk.__file__)))
    try:
        return subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--sample-ms", type=float, default=20.0, help="CPU time per variant per round"
    )
    parser.add_argument(
        "--gemm", action="store_true", help="the forward GEMM alone against torch.addmm"
    )
    parser.add_argument(
        "--engines", action="store_true", help="with --gemm: every engine pinned, against addmm"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(
        f"magneto_kernels from {os.path.dirname(mk.__file__)} (git {revision()}), "
        f"torch {torch.__version__}, 1 thread, {args.dtype}, {args.rounds} rounds; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs"
    )
    if args.gemm:
        print(f"cpu GEMM engine: {_C.cpu_gemm_engine()}; time(ours) / time(torch.addmm), median")
        print("(min–max) over rounds\n")
        if args.engines:
            return engine_table(args.rounds, args.sample_ms, getattr(torch, args.dtype))
        gemm_table(args.rounds, args.sample_ms, getattr(torch, args.dtype))
        return
    print(
        f"backend=None resolves to {mk.resolve_backend(None, torch.empty(1))!r}; "
        f"times in µs per call (process CPU time), medians over rounds\n"
    )
    print(
        "| op | rows×K→N | grad | torch.ops | raw | public | public 2-D | eager | public − raw "
        "(spread) | public / eager |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for rows, width, out_features in SIZES:
        for grad in (False, True):
            for op, variants in cases(rows, width, out_features, grad).items():
                with torch.set_grad_enabled(grad):
                    r = measure(variants, args.rounds, args.sample_ms)
                size = f"{rows}×{width}" + (f"→{out_features}" if op == "ln_linear" else "")
                print(
                    f"| {op} | {size} | {'yes' if grad else 'no_grad'} | {r['ops']:.1f} | "
                    f"{r['raw']:.1f} | "
                    f"{r['public']:.1f} | {r['public_2d']:.1f} | {r['eager']:.1f} | "
                    f"{r['overhead']:+.1f} ({r['spread']:.1f}) | "
                    f"{r['public'] / r['eager']:.2f} |",
                    flush=True,
                )
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
