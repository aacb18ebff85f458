"""GPU timing table for the Triton kernels (and the "cuda" backend where built), side by side.

    python3 bench/bench_gpu.py [--out DIR] [--quick] [--rounds 5]
    TRITON_INTERPRET=1 python3 bench/bench_gpu.py --smoke-cpu   (checks this script on CPU:
        tiny shapes, the interpreter, one wall-clock round; the numbers mean nothing)

What ``python -m magneto.report --device cuda`` does not time, at larger sizes: rms_norm, and
ln_linear with an output GELU and with dropout. Timing, rounds, ratios, machine info and tables
come from the project's one benchmark harness (``magneto.report.harness``): each table's
variants run in interleaved rounds, each measurement a ``triton.testing.do_bench`` median, and
every ratio is the median (min–max) of per-round ratios. Rows (bf16, all measured in this run):
- layer_norm forward / backward at 32768×4096 against the device copy bandwidth measured here
  (``y.copy_(x)``): fraction = (bytes moved / time) / copy bandwidth. Forward moves x and y,
  backward moves dy, x and dx (the stats and parameters are negligible).
- ln_linear at M=16384, K=N=4096 (LayerNorm with affine, bias): forward and forward+backward
  against torch.matmul (same shapes, no norm), torch eager LayerNorm→Linear and torch.compile
  of the reference op; plus the Sub-LN variants (fc1 with GELU, out_proj with residual+dropout).
- With ``--fitting``, Fitting the GPU (docs/design.md): the forward GEMM of ln_linear at the
  report's sizes (fc1, fc2, decode rows), per dot kind (bf16, fp32 with tf32, exact fp32): its
  achieved fraction of the GPU's published peak beside the fraction ``expected_fraction``
  predicts from the tile and the compiled kernel's registers and shared memory;
  tests/test_triton_compile.py writes the same model's predictions for sm_80 and sm_90a into
  docs/design.md.

Writes ``bench_gpu.md`` (markdown) and ``bench_gpu.json`` to --out (default: $OUT, else
bench/results/); ``--fitting`` instead writes the "Fitting the GPU" table to
``bench_gpu_fitting.{md,json}``. Needs a CUDA GPU (exits with status 2 without one) unless
--smoke-cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_INTERPRET", "0")

import magneto_kernels as mk  # noqa: E402
import magneto_kernels.triton  # noqa: E402,F401  (registers the triton family's kernels)
from magneto.report import harness  # noqa: E402
from magneto_kernels import reference  # noqa: E402
from magneto_kernels.backends import FAMILY  # noqa: E402
from magneto_kernels.library import get_op  # noqa: E402

DEVICE = "cuda"

# The model of docs/design.md, Fitting the GPU: per architecture, the GPU whose published peaks
# it uses (dense FLOP/s per dot kind, HBM bytes/s), its SMs and what an SM holds.
GPUS = {
    80: dict(gpu="A100 SXM", sms=108, smem_sm=164 * 1024, hbm=2.0e12,
             peak={"mma16": 312e12, "tf32": 156e12, "ieee": 19.5e12}),
    90: dict(gpu="H100 SXM", sms=132, smem_sm=228 * 1024, hbm=3.35e12,
             peak={"mma16": 989e12, "tf32": 495e12, "ieee": 67e12}),
}  # fmt: skip
REGS_PER_SM, THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32


def blocks_per_sm(regs: int, smem: int, num_warps: int, arch: int) -> int:
    """Blocks of a kernel one SM holds at once: registers (allocated per warp in units of 256),
    shared memory (1 KiB per block reserved), threads, and the block limit."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = GPUS[arch]["smem_sm"] // (smem + 1024)
    return min(by_regs, by_smem, THREADS_PER_SM // (32 * num_warps), MAX_BLOCKS_PER_SM)


def expected_fraction(m, k, n, kind, block_m, block_n, blocks, itemsize, arch) -> dict:
    """A roofline of one GEMM (m×k by k×n) on ``arch``'s GPU, with the tile's padding and its
    waves: ``blocks`` per SM run at once, each at an equal share of the dot kind's peak; memory
    is every operand and the output moved once (perfect L2 reuse). An upper bound: it leaves
    out the prologue's arithmetic, the pipeline's fill and the epilogue."""
    gpu = GPUS[arch]
    slots = gpu["sms"] * blocks
    programs = -(-m // block_m) * -(-n // block_n)
    waves = -(-programs // slots)
    compute = waves * 2.0 * block_m * block_n * k * slots / gpu["peak"][kind]
    memory = (m * k + n * k + m * n) * itemsize / gpu["hbm"]
    return dict(
        programs=programs,
        waves=waves,
        bound="compute" if compute >= memory else "memory",
        fraction=2.0 * m * n * k / gpu["peak"][kind] / max(compute, memory),
    )


def cuda_backend_available() -> bool:
    return DEVICE == "cuda" and mk.available_backends("cuda").get("cuda") is None


def ms(seconds: list[float]) -> float:
    return 1e3 * harness.time_stats(seconds)["median_s"]


def layer_norm_rows(rows: int, width: int, dtype, rounds: int, timer: harness.Timer) -> list[dict]:
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype) + 1.0
    w = torch.randn(width, device=DEVICE, dtype=dtype) * 0.1 + 1.0
    b = torch.randn(width, device=DEVICE, dtype=dtype) * 0.1
    dy = torch.randn_like(x)
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    variants = {"copy": lambda: y.copy_(x)}
    moved = {"copy": 2 * nbytes}
    for backend in ["triton"] + (["cuda"] if cuda_backend_available() else []):
        fwd = get_op("layer_norm", FAMILY[backend])
        bwd = get_op("layer_norm_backward", FAMILY[backend])
        _, mean, rstd = fwd(x, w, b, 1e-5, "layer")
        variants[f"layer_norm fwd [{backend}]"] = lambda fwd=fwd: fwd(x, w, b, 1e-5, "layer")
        variants[f"layer_norm bwd [{backend}]"] = lambda bwd=bwd, mean=mean, rstd=rstd: bwd(
            dy, x, w, b, mean, rstd, None, "layer", [True, True, True]
        )
        variants[f"rms_norm fwd [{backend}]"] = lambda fwd=fwd: fwd(x, w, None, 1e-5, "rms")
        moved.update(
            {
                f"layer_norm fwd [{backend}]": 2 * nbytes,
                f"layer_norm bwd [{backend}]": 3 * nbytes,
                f"rms_norm fwd [{backend}]": 2 * nbytes,
            }
        )
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    yt = F.layer_norm(leaves[0], (width,), leaves[1], leaves[2])
    variants["layer_norm fwd [torch]"] = lambda: F.layer_norm(x, (width,), w, b)
    # dx, dweight and dbias, as ours
    variants["layer_norm bwd [torch]"] = lambda: torch.autograd.grad(
        yt, leaves, dy, retain_graph=True
    )
    moved.update({"layer_norm fwd [torch]": 2 * nbytes, "layer_norm bwd [torch]": 3 * nbytes})

    times = harness.interleaved(variants, rounds, timer)
    # Fraction of the copy bandwidth, per round: the time the bytes take at the copy's speed
    # over the op's time.
    out = []
    for name, t in times.items():
        ideal = [c * moved[name] / moved["copy"] for c in times["copy"]]
        out.append(
            {
                "op": f"copy {rows}x{width} {dtype}" if name == "copy" else name,
                "ms": ms(t),
                "GB/s": moved[name] / harness.time_stats(t)["median_s"] / 1e9,
                "fraction of copy": harness.ratio_stats(ideal, t),
            }
        )
    return out


def ln_linear_rows(m: int, k: int, n: int, dtype, rounds: int, timer: harness.Timer) -> list[dict]:
    dev = DEVICE
    x = torch.randn(m, k, device=dev, dtype=dtype) + 0.5
    g = torch.randn(k, device=dev, dtype=dtype) * 0.1 + 1.0
    beta = torch.randn(k, device=dev, dtype=dtype) * 0.1
    w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=dev, dtype=dtype) * 0.1
    res = torch.randn(m, n, device=dev, dtype=dtype)
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    flops = 2.0 * m * n * k
    params = [t.requires_grad_() for t in (x, g, beta, w, bias)]

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def fwd_bwd(fn):
        def run():  # the gradients are dropped in the call, so that none accumulates
            fn().backward(dy)
            for t in params:
                t.grad = None

        return run

    matmul = f"torch.matmul {m}x{k}x{n}"
    calls = {
        matmul: lambda: torch.matmul(x, w.t()),
        "torch eager LayerNorm+Linear": lambda: F.linear(F.layer_norm(x, (k,), g, beta), w, bias),
    }
    compiled = torch.compile(
        lambda x, g, beta, w, bias: reference.ln_linear(x, g, beta, w, bias),
        backend="inductor" if DEVICE == "cuda" else "aot_eager",
    )
    calls["torch.compile(reference.ln_linear)"] = lambda: compiled(x, g, beta, w, bias)
    for backend in ["triton"] + (["cuda"] if cuda_backend_available() else []):
        calls[f"ln_linear [{backend}]"] = lambda be=backend: mk.ln_linear(
            x, g, beta, w, bias, backend=be
        )
        calls[f"ln_linear gelu (fc1) [{backend}]"] = lambda be=backend: mk.ln_linear(
            x, g, beta, w, bias, activation="gelu", backend=be
        )
        calls[f"ln_linear in_act+residual+dropout (fc2) [{backend}]"] = lambda be=backend: (
            mk.ln_linear(
                x,
                g,
                beta,
                w,
                bias,
                input_activation="gelu",
                residual=res,
                dropout_p=0.1,
                backend=be,
            )
        )
    variants = {}
    for name, fn in calls.items():
        variants[f"fwd {name}"] = fwd(fn)
        variants[f"fwd+bwd {name}"] = fwd_bwd(fn)
    times = harness.interleaved(variants, rounds, timer)
    return [
        {
            "op": name,
            "fwd ms": ms(times[f"fwd {name}"]),
            "fwd TFLOP/s": flops / harness.time_stats(times[f"fwd {name}"])["median_s"] / 1e12,
            "fwd / matmul": harness.ratio_stats(times[f"fwd {name}"], times[f"fwd {matmul}"]),
            "fwd+bwd ms": ms(times[f"fwd+bwd {name}"]),
            "fwd+bwd / matmul": harness.ratio_stats(
                times[f"fwd+bwd {name}"], times[f"fwd+bwd {matmul}"]
            ),
        }
        for name in calls
    ]


def fitting_rows(rounds: int, timer: harness.Timer) -> list[dict]:
    """ln_linear's forward (LayerNorm, bias) at the report's GEMM sizes per dot kind: achieved
    and expected fraction of the published peak, and the compiled kernel's registers, spills
    and shared memory (from Triton's kernel cache)."""
    from magneto.report.cli import SIZES
    from magneto_kernels.triton import configs, gemm

    arch = 10 * torch.cuda.get_device_capability()[0]
    sz = SIZES["cuda"]
    shapes = [("fc1", sz.rows, sz.d, sz.ffn), ("fc2", sz.rows, sz.ffn, sz.d)]
    shapes += [("fc1 decode", r, sz.d, sz.ffn) for r in sz.decode_rows]
    out = []
    for kind, dtype, precision in (
        ("mma16", torch.bfloat16, "highest"),
        ("tf32", torch.float32, "high"),
        ("ieee", torch.float32, "highest"),
    ):
        torch.set_float32_matmul_precision(precision)
        for label, m, k, n in shapes:
            x = torch.randn(m, k, device=DEVICE, dtype=dtype) + 0.5
            g, b = torch.ones(k, device=DEVICE), torch.zeros(k, device=DEVICE)
            w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
            bias = torch.zeros(n, device=DEVICE, dtype=dtype)

            def call(x=x, g=g, b=b, w=w, bias=bias):
                with torch.no_grad():
                    mk.ln_linear(x, g, b, w, bias, backend="triton")

            for cache in gemm._ln_matmul_kernel.device_caches.values():
                cache[0].clear()  # so that what is left compiled is this shape's
            configs._CHOSEN.clear()
            seconds = harness.interleaved({"gemm": call}, rounds, timer)["gemm"]
            tile = configs.gemm_tiles(dtype, m)[0]
            chosen = [t for key, t in configs._CHOSEN.items() if key[0] is gemm._ln_matmul_kernel]
            tile = chosen[-1] if chosen else tile
            compiled = [
                c
                for cache in gemm._ln_matmul_kernel.device_caches.values()
                for c in cache[0].values()
                if (c.metadata.num_warps, c.metadata.num_stages)
                == (tile.num_warps, tile.num_stages)
            ]
            regs = max(c.n_regs for c in compiled)
            smem = max(c.metadata.shared for c in compiled)
            meta = dict(tile.meta)
            model = dict(fraction=float("nan"), bound="?")  # a GPU the model has no peaks of
            if arch in GPUS:
                model = expected_fraction(
                    m, k, n, kind, meta["BLOCK_M"], meta["BLOCK_N"],
                    blocks_per_sm(regs, smem, tile.num_warps, arch), tile.itemsize, arch,
                )  # fmt: skip
            flops = 2.0 * m * n * k / harness.time_stats(seconds)["median_s"]
            peak = GPUS[arch]["peak"][kind] if arch in GPUS else float("nan")
            out.append(
                {
                    "GEMM": f"{label} M={m} K={k} N={n}",
                    "dot": kind,
                    "tile": str(tile),
                    "regs": regs,
                    "spills": max(c.n_spills for c in compiled),
                    "smem KiB": smem / 1024,
                    "TFLOP/s": flops / 1e12,
                    "fraction of peak": flops / peak,
                    "expected": model["fraction"],
                    "bound": model["bound"],
                }
            )
    torch.set_float32_matmul_precision("highest")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT")
        or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per table")
    parser.add_argument("--fitting", action="store_true", help='only the "Fitting the GPU" table')
    parser.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="check the script on CPU under TRITON_INTERPRET=1 (no timing value)",
    )
    args = parser.parse_args()
    global DEVICE
    if args.smoke_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device visible; nothing to time", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype = torch.bfloat16
    ln_shape = (4096, 4096) if args.quick else (32768, 4096)
    mm_shape = (2048, 1024, 1024) if args.quick else (16384, 4096, 4096)
    rounds = args.rounds
    if args.smoke_cpu:
        dtype, ln_shape, mm_shape, rounds = torch.float32, (4, 300), (40, 48, 56), 1
    timer = harness.cpu_timer() if args.smoke_cpu else harness.gpu_timer()
    started = time.time()
    info = harness.machine_info(DEVICE)
    header = (
        f"{info.get('gpu', 'CPU smoke run')} · torch {info['torch']} · triton "
        f"{info['triton']} · cuda backend: {'yes' if cuda_backend_available() else 'no'}"
        f" · {info['date']}\n\n{rounds} interleaved rounds, {timer.clock}; ratios: median "
        "(min–max) of per-round ratios\n\n"
    )
    sections = []
    results = {"machine": info}
    tables = [
        (
            f"LayerNorm {ln_shape[0]}x{ln_shape[1]} {dtype} vs copy bandwidth",
            layer_norm_rows,
            (*ln_shape, dtype),
        ),
        (
            f"ln_linear M={mm_shape[0]} K={mm_shape[1]} N={mm_shape[2]} {dtype}",
            ln_linear_rows,
            (*mm_shape, dtype),
        ),
    ]
    if args.fitting and not args.smoke_cpu:
        tables = [("Fitting the GPU: ln_linear's forward GEMM", fitting_rows, ())]
    for title, fn, args_ in tables:
        rows = fn(*args_, rounds, timer)
        results[title] = [
            {c: v.as_dict() if isinstance(v, harness.RatioStats) else v for c, v in r.items()}
            for r in rows
        ]
        cols = list(rows[0])
        sections.append(
            "\n".join(
                [
                    f"### {title}",
                    "",
                    *harness.markdown_table(cols, [[r[c] for c in cols] for r in rows]),
                ]
            )
            + "\n"
        )
        print(sections[-1], flush=True)
    text = header + "\n".join(sections) + f"\n(total {time.time() - started:.0f} s)\n"
    os.makedirs(args.out, exist_ok=True)
    name = "bench_gpu_fitting" if args.fitting else "bench_gpu"
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}/{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
