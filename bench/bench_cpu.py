"""CPU benchmark of the C++ backend (issue 4's CPU speed goals), fp32, ratios measured side by side.

- ``ln_linear`` forward+backward at M=1024 for the two FFN shapes (K=768→N=3072 like fc1: LN,
  bias; K=3072→N=768 like fc2: GELU on the input, LN, bias, residual), against
  (a) the same three GEMMs alone (H @ W^T, dz @ W, dz^T @ H on ready-made operands) — goal:
      within 1.10×, and
  (b) the eager reference (``backend="reference"``: F.layer_norm, F.linear, adds, autograd) —
      goal: faster by more than the run-to-run spread;
- ``layer_norm`` forward and backward at 8192×1024 against ``torch.nn.functional.layer_norm``
  (aten's native_layer_norm / native_layer_norm_backward) — goal: no slower.

The machine is shared and noisy, so every round times each variant once, interleaved, and the
ratios are taken per round: the tables give their median and the spread (min–max over rounds).
Each thread count gets its own tables. With one thread the clock is the process's CPU time
(``time.process_time``), which other processes' load does not inflate; with more threads it is
wall time (CPU time would count threads waiting at barriers).

    python bench/bench_cpu.py [--rounds 21] [--threads 1 2] [--out bench/results/cpu.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import magneto_kernels as mk
from magneto_kernels import _C
from magneto_kernels.library import get_op


CLOCK = time.perf_counter


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def interleaved(variants: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each variant, one call of each per round, in rotating order."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(variants[name]))
    return times


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


def ln_linear_variants(m: int, k: int, n: int, fc2: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g) * 2 + 1
    lw, lb = torch.randn(k, generator=g) * 0.2 + 1, torch.randn(k, generator=g) * 0.1
    w, b = torch.randn(n, k, generator=g) * k ** -0.5, torch.randn(n, generator=g) * 0.1
    r = torch.randn(m, n, generator=g) if fc2 else None
    dy = torch.randn(m, n, generator=g)
    options = dict(input_activation="gelu" if fc2 else None, residual=r)
    leaves = [t.clone().requires_grad_() for t in (x, lw, lb, w, b)]

    def fused(backend):
        def run():
            out = mk.ln_linear(*leaves, backend=backend, **options)
            torch.autograd.backward(out, dy)
            for t in leaves:
                t.grad = None
        return run

    h = F.layer_norm(x, (k,), lw, lb)

    def gemms():
        torch.mm(h, w.t())
        torch.mm(dy, w)
        torch.mm(dy.t(), h)

    return {"magneto cpu": fused("cpu"), "GEMMs alone": gemms, "eager reference": fused("reference")}


def layer_norm_variants(rows: int, cols: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * 2 + 1
    w, b = torch.randn(cols, generator=g) * 0.2 + 1, torch.randn(cols, generator=g) * 0.1
    dy = torch.randn(rows, cols, generator=g)
    _, mean, rstd = get_op("layer_norm", "cpp")(x, w, b, 1e-5, "layer")
    _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(x, [cols], w, b, 1e-5)
    ours_bwd = get_op("layer_norm_backward", "cpp")
    return {
        "fwd magneto cpu": lambda: mk.layer_norm(x, w, b, backend="cpu"),
        "fwd F.layer_norm": lambda: F.layer_norm(x, (cols,), w, b),
        "bwd magneto cpu": lambda: ours_bwd(dy, x, w, b, mean, rstd, None, "layer",
                                            [True, True, True]),
        "bwd aten": lambda: torch.ops.aten.native_layer_norm_backward(
            dy, x, [cols], t_mean, t_rstd, w, b, [True, True, True]),
    }


def tables(rounds: int) -> list[str]:
    lines = ["| shape | options | magneto cpu (ms) | GEMMs alone (ms) | eager reference (ms) | "
             "cpu / GEMMs | cpu / eager |",
             "|---|---|---|---|---|---|---|"]
    for k, n, fc2 in ((768, 3072, False), (3072, 768, True)):
        times = interleaved(ln_linear_variants(1024, k, n, fc2), rounds)
        ours, gemm, eager = (times[v] for v in ("magneto cpu", "GEMMs alone", "eager reference"))
        rg, rg_lo, rg_hi = ratio_stats(ours, gemm)
        re, re_lo, re_hi = ratio_stats(ours, eager)
        opts = "LN, gelu input act, bias, residual" if fc2 else "LN, bias"
        lines.append(f"| K={k}, N={n} | {opts} | {1e3 * statistics.median(ours):.1f} | "
                     f"{1e3 * statistics.median(gemm):.1f} | {1e3 * statistics.median(eager):.1f} | "
                     f"{rg:.3f} ({rg_lo:.3f}–{rg_hi:.3f}) | {re:.3f} ({re_lo:.3f}–{re_hi:.3f}) |")
        print(lines[-1], flush=True)

    lines += ["", "layer_norm 8192×1024:", "",
              "| pass | magneto cpu (ms) | torch (ms) | magneto / torch |", "|---|---|---|---|"]
    times = interleaved(layer_norm_variants(8192, 1024), rounds * 2)
    for p, theirs in (("fwd", "fwd F.layer_norm"), ("bwd", "bwd aten")):
        ours = times[f"{p} magneto cpu"]
        r, lo, hi = ratio_stats(ours, times[theirs])
        lines.append(f"| {p} | {1e3 * statistics.median(ours):.2f} | "
                     f"{1e3 * statistics.median(times[theirs]):.2f} | {r:.3f} ({lo:.3f}–{hi:.3f}) |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    global CLOCK
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu.md"))
    args = parser.parse_args()
    torch.manual_seed(0)

    lines = ["# CPU benchmark (bench/bench_cpu.py)", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, kernels built for `{_C.cpu_capability()}`; fp32; "
             f"{args.rounds} interleaved rounds; ratio = median over rounds of per-round ratios "
             "(spread = min–max over rounds). 1 thread: process CPU time; more: wall time.", ""]
    for threads in args.threads:
        torch.set_num_threads(threads)
        CLOCK = time.process_time if threads == 1 else time.perf_counter
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", "",
                  "ln_linear forward+backward, M=1024:", ""]
        print(lines[-4], flush=True)
        lines += tables(args.rounds) + [""]

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
