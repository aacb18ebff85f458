"""The CPU GEMM engines side by side (csrc/cpu/gemm.h): torch's at::mm (MKL in torch's CPU
wheels), torch's oneDNN linear and, in bf16, at::mm in float32 on widened operands, each
pinned, for ln_linear's three GEMM roles at the FFN shapes, fp32 and bf16. Each ratio is the
engine's time over aten's (below 1: faster than aten), the median of interleaved rounds with its
range ("refused": oneDNN has no kernel for the dtype on this CPU); ``auto`` is the engine the
cpu backend measured.

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


def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN linear has a kernel for dtype on this CPU (pinned to onednn, the
    backend would run aten instead, which the ratio must not pass off as oneDNN's)."""
    try:
        x = torch.ones(4, 8, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, torch.ones(8, 8, dtype=dtype), None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = harness.cpu_timer(args.threads)
    print("# CPU GEMM engines / aten (MKL), per ln_linear GEMM role\n")
    print(f"{harness.cpu_model()}, {args.threads} threads, {timer.clock}, {args.rounds} rounds\n")
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        policies = ["aten"] + (["onednn"] if _onednn_runs(dtype) else [])
        policies += ["widened"] if dtype != torch.float32 else []
        for rows in args.rows:
            for k, n in SHAPES:
                for role in ("forward", "input_grad", "weight_grad"):
                    a, b, out = _operands(role, rows, k, n, dtype)

                    def run(policy, a=a, b=b, out=out, role=role):
                        _C._set_cpu_gemm_policy(policy)
                        _C._cpu_gemm(a, b, out, False, role)

                    variants = {p: (lambda p=p: run(p)) for p in policies}
                    times = harness.interleaved(variants, args.rounds, timer)
                    ratios = [
                        str(harness.ratio_stats(times[p], times["aten"])) if p in times else none
                        for p, none in (("onednn", "refused"), ("widened", "—"))
                    ]
                    _C._set_cpu_gemm_policy("auto")
                    _C._cpu_gemm(a, b, out, False, role)
                    chosen = _C.cpu_gemm_engine().rsplit(": ", 1)[-1]
                    name = str(dtype).removeprefix("torch.")
                    rows_out.append((name, f"{rows}x{k}->{n}", role, *ratios, chosen))
    header = (
        "dtype",
        "GEMM (rows x in -> out)",
        "role",
        "oneDNN / aten",
        "widened / aten",
        "auto chose",
    )
    print("\n".join(harness.markdown_table(header, rows_out)))


if __name__ == "__main__":
    main()
