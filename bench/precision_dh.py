"""The dtype of dh = dz @ weight in ln_linear's backward (docs/design.md, Numerics): the bf16
error of dx and dgamma against float64 with dh rounded to bf16 (the cpu backend's GEMM output)
and with dh kept in float32 (Triton's; here the cpu GEMM on float32 copies followed by the
native norm backward on float32 rows, whose dx is rounded once), and the cost of the float32 dh
GEMM on one thread. Usage:

    python3 -m bench.precision_dh
"""

import statistics
import time

import torch

import magneto_kernels as mk
from magneto_kernels import reference
from magneto_kernels.library import get_op

ROWS, K, N = 2048, 1024, 1024


def _inputs(dtype, param_dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, mean=0.0, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean).to(dt)

    return {
        "x": randn(ROWS, K, mean=1.5, std=2.0),
        "ln_weight": randn(K, mean=1.0, std=0.3, dt=param_dtype),
        "ln_bias": randn(K, mean=0.1, std=0.3, dt=param_dtype),
        "weight": randn(N, K, std=K**-0.5),
        "dy": randn(ROWS, N, mean=0.3),
    }


def _grads(t, run):
    leaves = {k: v.detach().clone().requires_grad_(k in ("x", "ln_weight")) for k, v in t.items()}
    out = run(leaves)
    out.backward(leaves["dy"])
    return leaves["x"].grad.double(), leaves["ln_weight"].grad.double()


def _float32_dh(t):
    """dx, dgamma with dh = dz @ weight kept float32 (dz = dy: no output activation)."""
    x, w = t["x"], t["weight"]
    _, mean, rstd = get_op("layer_norm", "native")(x, t["ln_weight"], t["ln_bias"], 1e-5, "layer")
    dh = t["dy"].float() @ w.float()
    dx, dgamma, _ = get_op("layer_norm_backward", "native")(
        dh, x.float(), t["ln_weight"].float(), t["ln_bias"].float(), mean, rstd, None, "layer",
        [True, True, False],
    )  # fmt: skip
    return dx.to(x.dtype).double(), dgamma.to(t["ln_weight"].dtype).double()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    torch.set_num_threads(1)
    for param in (torch.bfloat16, torch.float32):
        t = _inputs(torch.bfloat16, param)
        t64 = {k: v.double() for k, v in t.items()}

        def fused(backend):
            return lambda a: mk.ln_linear(
                a["x"], a["ln_weight"], a["ln_bias"], a["weight"], backend=backend
            )

        def eager(a):
            return reference.ln_linear(a["x"], a["ln_weight"], a["ln_bias"], a["weight"])

        want = _grads(t64, eager)
        rows = {
            "PyTorch eager bf16": _grads(t, eager),
            "cpu, dh bf16 (now)": _grads(t, fused("cpu")),
            "cpu GEMM, dh float32": _float32_dh(t),
        }
        print(f"bf16 x, {str(param)[6:]} norm parameters, {ROWS}x{K} -> {N}: rel. error dx, dgamma")
        for name, (dx, dgamma) in rows.items():
            print(f"  {name:24s} {_rel(dx, want[0]):.2e}  {_rel(dgamma, want[1]):.2e}")
    dz = torch.randn(ROWS, N, dtype=torch.bfloat16)
    w = torch.randn(N, K, dtype=torch.bfloat16)
    runs = {
        "bf16 GEMM": lambda: dz @ w,
        "float32 copies + float32 GEMM": lambda: dz.float() @ w.float(),
    }
    times = {name: [] for name in runs}
    for _ in range(11):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bf16 GEMM"])
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"  dh GEMM {name:30s} {ms * 1e3:8.2f} ms  x{ms / base:.2f}")


if __name__ == "__main__":
    main()
