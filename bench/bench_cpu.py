"""CPU benchmark of the C++ backend against its GEMMs and eager PyTorch, fp32, ratios side by side.

- ``ln_linear`` forward+backward at M=1024 for the two FFN shapes (K=768→N=3072 like fc1: LN,
  bias; K=3072→N=768 like fc2: GELU on the input, LN, bias, residual), against
  (a) the same three GEMMs alone (H @ W^T, dz @ W, dz^T @ H on ready-made operands, fresh outputs)
      run as the op runs them (csrc/cpu/gemm.h: torch's at::mm, MKL in torch's CPU wheels) — goal:
      within 1.10×;
  (b) the eager reference (``backend="reference"``: F.layer_norm, F.linear, adds, autograd) —
      goal: faster by more than the run-to-run spread.
- ``layer_norm`` forward and backward at 8192×1024 against ``torch.nn.functional.layer_norm``
  (aten's native_layer_norm / native_layer_norm_backward) — goal: no slower;
- one training step (forward+backward) of a whole Sub-LN encoder layer with its final LayerNorm
  (d=768, 12 heads, FFN 3072, 2×512 tokens): magneto on the ``cpu`` backend against the same
  model on ``backend="reference"`` (plain PyTorch ops) and against torchscale 0.3.0.

Everything runs twice, in two processes: with glibc's default allocator settings, under which
every fresh block of more than 32 MiB (and, depending on glibc's adaptive thresholds, smaller
ones) is mapped anew and page-faulted in 4 KiB at a time on first touch, and with large blocks
kept for reuse (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 4 GB, what jemalloc or
tcmalloc give by default), which times the kernels rather than the page faults.

Timing, rounds, ratios, machine info and tables come from the project's one benchmark harness
(``magneto.report.harness``, shared with ``python -m magneto.report``): every round times each
variant once, interleaved, and the ratios are taken per round; the tables give their median and
the spread (min–max over rounds). Each thread count gets its own tables, headed by its clock
(``harness.cpu_timer``: the process's CPU time with one thread, wall time with more).

    python bench/bench_cpu.py [--rounds 21] [--threads 1 2] [--out bench/results/cpu.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

import magneto_kernels as mk
from magneto.report import harness
from magneto_kernels import _C
from magneto_kernels.backends import FAMILY
from magneto_kernels.library import get_op


def ln_linear_variants(m: int, k: int, n: int, fc2: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g) * 2 + 1
    lw, lb = torch.randn(k, generator=g) * 0.2 + 1, torch.randn(k, generator=g) * 0.1
    w, b = torch.randn(n, k, generator=g) * k**-0.5, torch.randn(n, generator=g) * 0.1
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

    def gemms(engine):
        def run():
            # as the cpu backend runs them: forward and weight gradient into new tensors
            engine(h, w.t(), None, "forward")
            engine(dy, w, torch.empty(m, k), "input_grad")
            engine(dy.t(), h, None, "weight_grad")

        return run

    def ours(a, b, out, role):
        _C._cpu_gemm(a, b, out, False, role)

    return {
        "magneto cpu": fused("cpu"),
        "GEMMs alone": gemms(ours),
        "eager reference": fused("reference"),
    }


def layer_norm_variants(rows: int, cols: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * 2 + 1
    w, b = torch.randn(cols, generator=g) * 0.2 + 1, torch.randn(cols, generator=g) * 0.1
    dy = torch.randn(rows, cols, generator=g)
    _, mean, rstd = get_op("layer_norm", FAMILY["cpu"])(x, w, b, 1e-5, "layer")
    _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(x, [cols], w, b, 1e-5)
    ours_bwd = get_op("layer_norm_backward", FAMILY["cpu"])
    return {
        "fwd magneto cpu": lambda: mk.layer_norm(x, w, b, backend="cpu"),
        "fwd F.layer_norm": lambda: F.layer_norm(x, (cols,), w, b),
        "bwd magneto cpu": lambda: ours_bwd(
            dy, x, w, b, mean, rstd, None, "layer", [True, True, True]
        ),
        "bwd aten": lambda: torch.ops.aten.native_layer_norm_backward(
            dy, x, [cols], t_mean, t_rstd, w, b, [True, True, True]
        ),
    }


def encoder_layer_variants(
    d: int = 768, heads: int = 12, ffn: int = 3072, batch: int = 2, tokens: int = 512
) -> dict:
    from bench_memory import magneto_encoder, torchscale_encoder

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, d, generator=g)
    dy = torch.randn(batch, tokens, d, generator=g)

    def step(model):
        model.train()

        def run():
            model(None, token_embeddings=x)["encoder_out"].backward(dy)
            model.zero_grad(set_to_none=True)

        return run

    return {
        "magneto cpu": step(magneto_encoder("cpu", d, heads, ffn)),
        "magneto reference": step(magneto_encoder("reference", d, heads, ffn)),
        "torchscale": step(torchscale_encoder(d, heads, ffn)),
    }


def ms(seconds: list[float]) -> float:
    return 1e3 * harness.time_stats(seconds)["median_s"]


def tables(rounds: int, timer: harness.Timer) -> list[str]:
    engine = _C.cpu_gemm_engine()
    header = [
        "shape",
        "options",
        "magneto cpu (ms)",
        f"GEMMs alone, {engine} (ms)",
        "eager reference (ms)",
        "cpu / GEMMs",
        "cpu / eager",
    ]
    rows = []
    for k, n, fc2 in ((768, 3072, False), (3072, 768, True)):
        times = harness.interleaved(ln_linear_variants(1024, k, n, fc2), rounds, timer)
        ours, gemm, eager = (times[v] for v in ("magneto cpu", "GEMMs alone", "eager reference"))
        opts = "LN, gelu input act, bias, residual" if fc2 else "LN, bias"
        rows.append(
            [
                f"K={k}, N={n}",
                opts,
                ms(ours),
                ms(gemm),
                ms(eager),
                *(harness.ratio_stats(a, b) for a, b in ((ours, gemm), (ours, eager))),
            ]
        )
    lines = harness.markdown_table(header, rows)
    print("\n".join(lines), flush=True)

    lines += [
        "",
        "one Sub-LN encoder layer + final LN, forward+backward (d=768, 12 heads, "
        "FFN 3072, 2×512 tokens):",
        "",
    ]
    times = harness.interleaved(encoder_layer_variants(), max(5, rounds // 3), timer)
    ours, ref, ts = (times[v] for v in ("magneto cpu", "magneto reference", "torchscale"))
    table = harness.markdown_table(
        [
            "magneto cpu (ms)",
            "magneto reference (ms)",
            "torchscale 0.3.0 (ms)",
            "cpu / reference",
            "cpu / torchscale",
        ],
        [
            [
                ms(ours),
                ms(ref),
                ms(ts),
                harness.ratio_stats(ours, ref),
                harness.ratio_stats(ours, ts),
            ]
        ],
    )
    print("\n".join(table), flush=True)
    lines += table

    lines += ["", "layer_norm 8192×1024:", ""]
    variants = layer_norm_variants(8192, 1024)
    rows = []
    for p, theirs in (("fwd", "fwd F.layer_norm"), ("bwd", "bwd aten")):
        # Each pass on its own, so that each kernel follows the other as often as itself (what a
        # kernel leaves in cache shifts the next one's time by up to ~10% at this size).
        times = harness.interleaved(
            {v: variants[v] for v in (f"{p} magneto cpu", theirs)}, rounds * 6, timer
        )
        ours = times[f"{p} magneto cpu"]
        rows.append([p, ms(ours), ms(times[theirs]), harness.ratio_stats(ours, times[theirs])])
    table = harness.markdown_table(
        ["pass", "magneto cpu (ms)", "torch (ms)", "magneto / torch"], rows
    )
    print("\n".join(table), flush=True)
    return lines + table


ALLOCATOR_MODES = {
    "default": ("glibc malloc, default settings", {}),
    "kept": (
        "large blocks kept for reuse (MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4 GB)",
        {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"},
    ),
}


def run_mode(args) -> list[str]:
    """This process's tables, under the allocator settings it was started with."""
    lines = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        timer = harness.cpu_timer(threads)
        lines += [
            f"### {threads} thread{'s' if threads > 1 else ''} ({timer.clock})",
            "",
            "ln_linear forward+backward, M=1024:",
            "",
        ]
        print(lines[-4], flush=True)
        lines += tables(args.rounds, timer) + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu.md")
    )
    parser.add_argument(
        "--allocator",
        choices=[*ALLOCATOR_MODES, "both"],
        default="both",
        help="which allocator settings to run under (each in its own process)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.allocator != "both":  # a child: the environment was set by the parent (or the user)
        lines = run_mode(args)
    else:
        lines = []
        for mode, (title, env) in ALLOCATOR_MODES.items():
            with tempfile.NamedTemporaryFile("r", suffix=".md") as part:
                print(f"## allocator: {title}", flush=True)
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--rounds",
                        str(args.rounds),
                        "--threads",
                        *map(str, args.threads),
                        "--allocator",
                        mode,
                        "--out",
                        part.name,
                    ],
                    env=dict(os.environ, **env),
                    check=True,
                )
                lines += [f"## Allocator: {title}", ""] + part.read().splitlines() + [""]
        info = harness.machine_info("cpu")
        lines = [
            "# CPU benchmark (bench/bench_cpu.py)",
            "",
            f"{info['date']}; {info['cpu']}, {info['cpus']} CPUs, torch {info['torch']}, "
            f"kernels built for `{info['kernel_isa']}`, GEMM engine "
            f"`{info['cpu_gemm_engine']}`; fp32; "
            f"{args.rounds} interleaved rounds (the encoder layer: a third as many); ratio = "
            "median over rounds of per-round ratios (spread = min–max over rounds).",
            "",
            f"Command: `python bench/bench_cpu.py --rounds {args.rounds} --threads "
            f"{' '.join(map(str, args.threads))}`",
            "",
        ] + lines

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
