"""The CPU GEMM engines side by side (csrc/cpu/gemm.h): torch's at::mm (MKL in torch's CPU
wheels) and torch's oneDNN linear, each pinned, for ln_linear's three GEMM roles at the FFN
shapes, fp32 and bf16. The ratio is oneDNN's time over aten's (below 1: oneDNN faster), the
median of interleaved rounds with its range; ``auto`` is the engine the cpu backend measured.

    python -m bench.bench_gemm_engine [--rounds 9] [--threads 1] [--rows 64 1024]
"""

from __future__ import annotations

import argparse

import torch

from magneto.report import harness
from magneto_kernels import _C

# (in_features, out_features): fc1's and fc2's shapes at d=768
SHAPES = ((768, 3072), (3072, 768))


def _operands(role: str, rows: int, k: int, n: int, dtype: torch.dtype):
    """(a, b, out) of the role's GEMM, laid out as ln_linear's backend passes them."""
    h, w, dz = (torch.randn(*shape).to(dtype) for shape in ((rows, k), (n, k), (rows, n)))
    if role == "forward":
        return h, w.t(), torch.empty(rows, n, dtype=dtype)
    if role == "input_grad":
        return dz, w, torch.empty(rows, k, dtype=dtype)
    return dz.t(), h, torch.empty(n, k, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = harness.cpu_timer(args.threads)
    print("# CPU GEMM engines: oneDNN / aten (MKL), per ln_linear GEMM role\n")
    print(f"{harness.cpu_model()}, {args.threads} threads, {timer.clock}, {args.rounds} rounds\n")
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        for rows in args.rows:
            for k, n in SHAPES:
                for role in ("forward", "input_grad", "weight_grad"):
                    a, b, out = _operands(role, rows, k, n, dtype)

                    def run(policy, a=a, b=b, out=out, role=role):
                        _C._set_cpu_gemm_policy(policy)
                        _C._cpu_gemm(a, b, out, False, role)

                    variants = {p: (lambda p=p: run(p)) for p in ("aten", "onednn")}
                    times = harness.interleaved(variants, args.rounds, timer)
                    ratio = harness.ratio_stats(times["onednn"], times["aten"])
                    _C._set_cpu_gemm_policy("auto")
                    _C._cpu_gemm(a, b, out, False, role)
                    chosen = _C.cpu_gemm_engine().rsplit(": ", 1)[-1]
                    name = str(dtype).removeprefix("torch.")
                    rows_out.append((name, f"{rows}x{k}->{n}", role, str(ratio), chosen))
    header = ("dtype", "GEMM (rows x in -> out)", "role", "oneDNN / aten", "auto chose")
    print("\n".join(harness.markdown_table(header, rows_out)))


if __name__ == "__main__":
    main()
