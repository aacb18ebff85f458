"""GPU timing table for the Triton kernels (and the "cuda" backend where built), side by side.

    python3 bench/bench_gpu.py [--out DIR] [--quick]
    TRITON_INTERPRET=1 python3 bench/bench_gpu.py --smoke-cpu   (checks this script on CPU:
        tiny shapes, the interpreter, one wall-clock run per entry; the numbers mean nothing)

Rows (bf16, triton.testing.do_bench medians, all measured in this one run):
- layer_norm forward / backward at 32768×4096 against the device copy bandwidth measured here
  (``y.copy_(x)``): fraction = (bytes moved / time) / copy bandwidth. Forward moves x and y,
  backward moves dy, x and dx (the stats and parameters are negligible).
- ln_linear at M=16384, K=N=4096 (LayerNorm with affine, bias): forward and forward+backward
  against torch.matmul (same shapes, no norm), torch eager LayerNorm→Linear and torch.compile
  of the reference op; plus the Sub-LN variants (fc1 with GELU, out_proj with residual+dropout).

Writes ``bench_gpu.md`` (markdown) and ``bench_gpu.json`` to --out (default: $OUT, else
bench/results/). Needs a CUDA GPU (exits with status 2 without one) unless --smoke-cpu.
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
from magneto_kernels import reference  # noqa: E402
from magneto_kernels.backends import FAMILY  # noqa: E402
from magneto_kernels.library import get_op  # noqa: E402

DEVICE = "cuda"


def bench(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn() (do_bench flushes L2 between runs); one wall-clock run in
    the CPU smoke mode."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                   return_mode="median")


def cuda_backend_available() -> bool:
    return DEVICE == "cuda" and mk.available_backends("cuda").get("cuda") is None


def layer_norm_rows(rows: int, width: int, dtype) -> list[dict]:
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype) + 1.0
    w = torch.randn(width, device=DEVICE, dtype=dtype) * 0.1 + 1.0
    b = torch.randn(width, device=DEVICE, dtype=dtype) * 0.1
    dy = torch.randn_like(x)
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    out = [{"op": f"copy {rows}x{width} {dtype}", "ms": copy_ms, "GB/s": copy_gbs,
            "fraction of copy": 1.0}]

    def add(name, ms, moved):
        gbs = moved / ms / 1e6
        out.append({"op": name, "ms": ms, "GB/s": gbs, "fraction of copy": gbs / copy_gbs})

    backends = ["triton"] + (["cuda"] if cuda_backend_available() else [])
    for backend in backends:
        fwd = get_op("layer_norm", FAMILY[backend])
        bwd = get_op("layer_norm_backward", FAMILY[backend])
        add(f"layer_norm fwd [{backend}]",
            bench(lambda: fwd(x, w, b, 1e-5, "layer")), 2 * nbytes)
        _, mean, rstd = fwd(x, w, b, 1e-5, "layer")
        add(f"layer_norm bwd [{backend}]",
            bench(lambda: bwd(dy, x, w, b, mean, rstd, None, "layer", [True, True, True])),
            3 * nbytes)
        add(f"rms_norm fwd [{backend}]", bench(lambda: fwd(x, w, None, 1e-5, "rms")), 2 * nbytes)
    add("layer_norm fwd [torch]", bench(lambda: F.layer_norm(x, (width,), w, b)), 2 * nbytes)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    yt = F.layer_norm(leaves[0], (width,), leaves[1], leaves[2])
    add("layer_norm bwd [torch]",   # dx, dweight and dbias, as ours
        bench(lambda: torch.autograd.grad(yt, leaves, dy, retain_graph=True)), 3 * nbytes)
    return out


def ln_linear_rows(m: int, k: int, n: int, dtype) -> list[dict]:
    dev = DEVICE
    x = torch.randn(m, k, device=dev, dtype=dtype) + 0.5
    g = torch.randn(k, device=dev, dtype=dtype) * 0.1 + 1.0
    beta = torch.randn(k, device=dev, dtype=dtype) * 0.1
    w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
    bias = torch.randn(n, device=dev, dtype=dtype) * 0.1
    res = torch.randn(m, n, device=dev, dtype=dtype)
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    flops = 2.0 * m * n * k
    params = [t.requires_grad_() for t in (x, g, beta, w, bias)]
    rows = []

    def add(name, fwd_ms, fb_ms, mm_fwd, mm_fb):
        rows.append({"op": name, "fwd ms": fwd_ms, "fwd TFLOP/s": flops / fwd_ms / 1e9,
                     "fwd / matmul": fwd_ms / mm_fwd if mm_fwd else None,
                     "fwd+bwd ms": fb_ms, "fwd+bwd / matmul": fb_ms / mm_fb if mm_fb else None})

    def timed(fn):
        def fwd():
            with torch.no_grad():
                fn()

        def fwd_bwd():
            fn().backward(dy)

        return bench(fwd), bench(fwd_bwd, grad_to_none=params)

    mm_fwd, mm_fb = timed(lambda: torch.matmul(x, w.t()))
    add(f"torch.matmul {m}x{k}x{n}", mm_fwd, mm_fb, mm_fwd, mm_fb)
    add("torch eager LayerNorm+Linear",
        *timed(lambda: F.linear(F.layer_norm(x, (k,), g, beta), w, bias)), mm_fwd, mm_fb)
    compiled = torch.compile(lambda x, g, beta, w, bias: reference.ln_linear(x, g, beta, w, bias),
                             backend="inductor" if DEVICE == "cuda" else "aot_eager")
    add("torch.compile(reference.ln_linear)", *timed(lambda: compiled(x, g, beta, w, bias)),
        mm_fwd, mm_fb)
    backends = ["triton"] + (["cuda"] if cuda_backend_available() else [])
    for backend in backends:
        add(f"ln_linear [{backend}]",
            *timed(lambda: mk.ln_linear(x, g, beta, w, bias, backend=backend)), mm_fwd, mm_fb)
        add(f"ln_linear gelu (fc1) [{backend}]",
            *timed(lambda: mk.ln_linear(x, g, beta, w, bias, activation="gelu", backend=backend)),
            mm_fwd, mm_fb)
        add(f"ln_linear in_act+residual+dropout (fc2) [{backend}]",
            *timed(lambda: mk.ln_linear(x, g, beta, w, bias, input_activation="gelu",
                                        residual=res, dropout_p=0.1, backend=backend)),
            mm_fwd, mm_fb)
    return rows


def to_markdown(title: str, rows: list[dict]) -> str:
    cols = list(rows[0].keys())
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="check the script on CPU under TRITON_INTERPRET=1 (no timing value)")
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
    if args.smoke_cpu:
        dtype, ln_shape, mm_shape = torch.float32, (4, 300), (40, 48, 56)
    started = time.time()
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke run"
    header = (f"{device_name} · torch {torch.__version__} · triton "
              f"{__import__('triton').__version__} · cuda backend: "
              f"{'yes' if cuda_backend_available() else 'no'}\n\n")
    sections = []
    results = {}
    for title, fn, shape in [
            (f"LayerNorm {ln_shape[0]}x{ln_shape[1]} {dtype} vs copy bandwidth",
             layer_norm_rows, ln_shape),
            (f"ln_linear M={mm_shape[0]} K={mm_shape[1]} N={mm_shape[2]} {dtype}",
             ln_linear_rows, mm_shape)]:
        rows = fn(*shape, dtype)
        results[title] = rows
        sections.append(to_markdown(title, rows))
        print(sections[-1], flush=True)
    text = header + "\n".join(sections) + f"\n(total {time.time() - started:.0f} s)\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}/bench_gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
