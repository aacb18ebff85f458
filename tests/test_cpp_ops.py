"""The C++ CPU backend (``backend="cpu"``, op family "native" of ``magneto_kernels._C``) against the
float64 reference: forward and every gradient, LayerNorm/RMSNorm/none, every activation on the
input and the output, residual with alpha, dropout, fp32/bf16/fp16, odd sizes, non-zero-mean rows;
plus the bit-identical Philox mask, deterministic reductions, the bindings' argument errors,
opcheck, every instruction-set build of the kernels, and agreement with the Triton kernels.

Closeness (DESIGN.md §4): ``‖out − ref64‖ ≤ max(RTOL·‖ref64‖, 2·‖torch − ref64‖) + atol``, where
``torch`` is PyTorch's own computation of the op in the same dtype (the reference module run on
the low-precision inputs). Every output and intermediate buffer of the bindings is NaN-poisoned
before the kernels write it.
"""
import os
import subprocess
import sys

import pytest
import torch

import magneto_kernels as mk
from magneto_kernels import reference
from magneto_kernels.library import get_op

from conftest import randn
from conftest import assert_close_to_reference as check

_C = pytest.importorskip("magneto_kernels._C", reason="C++ extension not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = ("none", "gelu", "gelu_tanh", "relu", "silu")


@pytest.fixture(autouse=True)
def poison_outputs():
    _C._set_poison_outputs(True)
    yield
    _C._set_poison_outputs(False)


def run_three(fn, tensors, grad_names, seed=0, **kwargs):
    """Runs fn on the CPU backend, on the reference in the same dtype, and on the reference in
    float64 (same inputs, same dropout seed); backpropagates one random non-zero-mean gradient
    through the first output of each. Returns three (outputs, {name: grad}) pairs."""
    results = []
    for backend, cast in (("cpu", None), ("reference", None), ("reference", torch.float64)):
        inputs = {}
        for name, t in tensors.items():
            if t is None:
                inputs[name] = None
                continue
            t = t.detach().clone() if cast is None else t.detach().to(cast)
            inputs[name] = t.requires_grad_(name in grad_names)
        torch.manual_seed(seed)
        outs = fn(**inputs, backend=backend, **kwargs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(1234)
        grad = randn(*outs[0].shape, dtype=outs[0].dtype, mean=0.3, generator=gen)
        grads = dict(zip(grad_names, torch.autograd.grad(
            outs[0], [inputs[n] for n in grad_names], grad)))
        results.append((outs, grads))
    return results


def check_all(results, atol=1e-6, reduction_rows=1):
    """Compares every output and gradient of run_three; row reductions (parameter gradients) get
    an atol growing with sqrt(rows)."""
    (outs, grads), (outs_t, grads_t), (outs_64, grads_64) = results
    for i, (o, ot, o64) in enumerate(zip(outs, outs_t, outs_64)):
        check(o, o64, ot, f"output {i}", atol=atol)
    for name in grads:
        scale = reduction_rows ** 0.5 if grads[name].dim() == 1 else 1.0
        check(grads[name], grads_64[name], grads_t[name], f"grad {name}", atol=atol * scale)


# -------------------------------------------------------------------------------- layer_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (37, 257), (3, 4099)])
def test_layer_norm(shape, norm, dtype):
    rows, cols = shape
    x = randn(rows, cols, dtype=dtype, mean=2.0, std=1.5)
    w = randn(cols, dtype=dtype, mean=1.0, std=0.3)
    b = randn(cols, dtype=dtype, mean=0.1, std=0.5) if norm == "layer" else None
    grads = ["x", "weight"] + (["bias"] if b is not None else [])
    res = run_three(lambda x, weight, bias, backend: mk.layer_norm(
        x, weight, bias, norm=norm, backend=backend), {"x": x, "weight": w, "bias": b}, grads)
    check_all(res, reduction_rows=rows)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_layer_norm_fp32_params_batch_dims_no_affine(norm):
    x = randn(2, 5, 96, dtype=torch.bfloat16, mean=-3.0)
    w = randn(96, mean=1.0, std=0.2)  # float32 parameters with bf16 activations
    b = randn(96, std=0.2) if norm == "layer" else None
    grads = ["x", "weight"] + (["bias"] if b is not None else [])
    res = run_three(lambda x, weight, bias, backend: mk.layer_norm(
        x, weight, bias, norm=norm, backend=backend), {"x": x, "weight": w, "bias": b}, grads)
    assert res[0][1]["weight"].dtype == torch.float32
    check_all(res, reduction_rows=10)
    res = run_three(lambda x, backend: mk.layer_norm(x, None, None, norm=norm, backend=backend),
                    {"x": randn(9, 130, mean=5.0)}, ["x"])
    check_all(res)


def test_layer_norm_large_mean_fp32():
    # |mean|/std = 1e3: fp32 LayerNorm loses digits here, ours no more than twice PyTorch's.
    x = randn(16, 512, mean=1000.0, std=1.0)
    res = run_three(lambda x, weight, backend: mk.layer_norm(x, weight, None, backend=backend),
                    {"x": x, "weight": randn(512, mean=1.0)}, ["x", "weight"])
    check_all(res, reduction_rows=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,alpha", [("layer", 1.0), ("layer", 2.3), ("rms", 0.7)])
def test_add_layer_norm(norm, alpha, dtype):
    rows, cols = 13, 161
    x = randn(rows, cols, dtype=dtype, mean=0.5)
    r = randn(rows, cols, dtype=dtype, mean=-1.0, std=2.0)
    w = randn(cols, dtype=dtype, mean=1.0, std=0.3)
    b = randn(cols, dtype=dtype, std=0.3) if norm == "layer" else None
    grads = ["x", "residual", "weight"] + (["bias"] if b is not None else [])

    def fn(x, residual, weight, bias, backend):
        y, s = mk.add_layer_norm(x, residual, weight, bias, alpha=alpha, norm=norm,
                                 backend=backend)
        # Both outputs carry gradient (the skip path's s feeds the next sublayer).
        return y + 0.5 * s, y, s

    res = run_three(fn, {"x": x, "residual": r, "weight": w, "bias": b}, grads)
    check_all(res, reduction_rows=rows)


def test_layer_norm_backward_accumulates_and_reductions_are_deterministic():
    x = randn(300, 72, mean=1.0)
    w, b = randn(72, mean=1.0), randn(72)
    dy, acc = randn(300, 72, mean=0.2), randn(300, 72)
    _, mean, rstd = get_op("layer_norm", "native")(x, w, b, 1e-5, "layer")
    bwd = get_op("layer_norm_backward", "native")
    dx, dw, db = bwd(dy, x, w, b, mean, rstd, acc, "layer", [True, True, True])
    dx0, _, _ = bwd(dy, x, w, b, mean, rstd, None, "layer", [True, False, False])
    check(dx, (dx0 + acc).double(), dx0 + acc, "dx with grad_accum")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, dw1, db1 = bwd(dy, x, w, b, mean, rstd, None, "layer", [False, True, True])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(dw, dw1) and torch.equal(db, db1), "dgamma/dbeta depend on thread count"


# --------------------------------------------------------------------------------- ln_linear

LN_LINEAR_CASES = [
    # norm, input_activation, activation, residual, alpha, dropout_p, bias
    ("layer", "none", "none", False, 1.0, 0.0, True),     # fc1 / q-k-v
    ("layer", "gelu", "none", True, 1.0, 0.0, True),      # fc2: act(u) -> ffn LN -> residual
    ("layer", "none", "none", True, 2.5, 0.0, False),     # out_proj, alpha-scaled residual
    ("rms", "silu", "gelu_tanh", True, 0.5, 0.0, True),
    ("layer", "relu", "relu", False, 1.0, 0.0, True),
    ("layer", "gelu_tanh", "silu", True, 1.0, 0.3, True),
    ("rms", "none", "gelu", False, 1.0, 0.2, False),
    ("none", "none", "none", False, 1.0, 0.0, True),      # plain linear
    ("none", "gelu", "none", True, 1.5, 0.1, True),       # activation only, no norm
    ("layer", "none", "none", True, 1.0, 0.4, True),      # dropout, no activation
]


def _ln_linear_case(case, dtype, rows=37, k=67, n=45, ln_param_dtype=None):
    norm, in_act, act, has_res, alpha, p, has_bias = case
    pd = ln_param_dtype or dtype
    tensors = {
        "x": randn(rows, k, dtype=dtype, mean=1.5, std=2.0),
        "ln_weight": None if norm == "none" else randn(k, dtype=pd, mean=1.0, std=0.3),
        "ln_bias": randn(k, dtype=pd, std=0.3) if norm == "layer" else None,
        "weight": randn(n, k, dtype=dtype, std=k ** -0.5),
        "bias": randn(n, dtype=dtype, mean=0.2, std=0.5) if has_bias else None,
        "residual": randn(rows, n, dtype=dtype, mean=-0.5) if has_res else None,
    }
    grads = [name for name, t in tensors.items() if t is not None]
    kwargs = dict(norm="layer" if norm == "none" else norm, input_activation=in_act,
                  activation=act, alpha=alpha, dropout_p=p)

    def fn(x, ln_weight, ln_bias, weight, bias, residual, backend, **kw):
        return mk.ln_linear(x, ln_weight, ln_bias, weight, bias, residual=residual,
                            backend=backend, **kw)

    return fn, tensors, grads, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", LN_LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ln_linear(case, dtype):
    fn, tensors, grads, kwargs = _ln_linear_case(case, dtype)
    res = run_three(fn, tensors, grads, seed=7, **kwargs)
    check_all(res, atol=1e-5, reduction_rows=37)


def test_ln_linear_fp16_fp32_ln_params_and_batch_dims():
    case = ("layer", "gelu", "silu", True, 1.0, 0.25, True)
    fn, tensors, grads, kwargs = _ln_linear_case(case, torch.float16, ln_param_dtype=torch.float32)
    res = run_three(fn, tensors, grads, seed=3, **kwargs)
    check_all(res, atol=1e-4, reduction_rows=37)
    x = randn(2, 3, 40, mean=4.0)
    w = randn(24, 40, std=0.2)
    out = mk.ln_linear(x, torch.ones(40), None, w, backend="cpu")
    assert out.shape == (2, 3, 24)
    check(out, reference.ln_linear(x.double(), torch.ones(40).double(), None, w.double()),
          reference.ln_linear(x, torch.ones(40), None, w), "batch dims")


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, True, False, False],
                                  [False, False, False, True, False], [False, False, False, False, True],
                                  [True, False, True, True, False]])
def test_ln_linear_backward_output_mask(mask):
    """Only the requested gradients come back; the rest are empty (library.py contract)."""
    x, lw, lb = randn(21, 50, mean=1.0), randn(50, mean=1.0), randn(50)
    w = randn(30, 50, std=0.15)
    fwd, bwd = get_op("ln_linear", "native"), get_op("ln_linear_backward", "native")
    seed = torch.tensor(99, dtype=torch.int64)
    args = ("layer", "gelu", "gelu", 1.0, 0.2)
    out, mean, rstd, preact = fwd(x, lw, lb, w, None, None, seed, 1e-5, *args[:3], *args[3:])
    assert preact.shape == out.shape and mean.shape == (21,) and rstd.shape == (21,)
    dy = randn(21, 30, mean=0.1)
    full = bwd(dy, x, lw, lb, w, mean, rstd, preact, seed, "layer", "gelu", "gelu", 0.2,
               [True] * 5)
    part = bwd(dy, x, lw, lb, w, mean, rstd, preact, seed, "layer", "gelu", "gelu", 0.2, mask)
    for wanted, f, g in zip(mask, full, part):
        if wanted:
            assert torch.equal(f, g)
        else:
            assert g.numel() == 0
    assert full[4].dtype == w.dtype and full[4].shape == (30,)


def test_ln_linear_return_conventions():
    x, w = randn(5, 16, mean=1.0), randn(8, 16)
    fwd = get_op("ln_linear", "native")
    _, mean, rstd, preact = fwd(x, torch.ones(16), None, w, None, None, None, 1e-5, "rms",
                                "none", "none", 1.0, 0.0)
    assert mean.numel() == 0 and rstd.shape == (5,) and preact.numel() == 0
    _, mean, rstd, preact = fwd(x, None, None, w, None, None, None, 1e-5, "none", "none",
                                "relu", 1.0, 0.0)
    assert mean.numel() == 0 and rstd.numel() == 0 and preact.shape == (5, 8)


# ----------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_bit_identical_to_reference(p):
    """x @ I with dropout: the zero pattern of the output (and of dx) is exactly the reference
    Philox mask, and kept values are scaled by 1/(1-p)."""
    rows, n = 33, 70
    x = randn(rows, n, mean=3.0, std=0.5).abs() + 0.5  # no zeros of its own
    eye = torch.eye(n)
    seed = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)
    fwd, bwd = get_op("ln_linear", "native"), get_op("ln_linear_backward", "native")
    out, mean, rstd, preact = fwd(x, None, None, eye, None, None, seed, 1e-5, "none", "none",
                                  "none", 1.0, p)
    keep = reference.dropout_mask(seed, (rows, n), p)
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)
    dy = randn(rows, n, mean=2.0).abs() + 0.5
    dx = bwd(dy, x, None, None, eye, mean, rstd, preact, seed, "none", "none", "none", p,
             [True, False, False, False, False])[0]
    assert torch.equal(dx != 0, keep)


def test_dropout_is_reproducible_through_manual_seed():
    x, w = randn(12, 20, mean=1.0), randn(16, 20)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(mk.ln_linear(x, torch.ones(20), None, w, dropout_p=0.5, backend="cpu"))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(6)
    assert not torch.equal(runs[0], mk.ln_linear(x, torch.ones(20), None, w, dropout_p=0.5,
                                                 backend="cpu"))


# ------------------------------------------------------------------------------- bad inputs

def _good_ln_linear_args():
    x = randn(6, 8, mean=1.0)
    return dict(x=x, ln_weight=torch.ones(8), ln_bias=torch.zeros(8) + 0.1, weight=randn(4, 8),
                bias=randn(4), residual=randn(6, 4), seed=None, eps=1e-5, norm="layer",
                input_activation="none", activation="none", alpha=1.0, dropout_p=0.0)


@pytest.mark.parametrize("change,needle", [
    (dict(x=randn(6, 8, dtype=torch.float64)), "x must be float32"),
    (dict(x=randn(48)), "x must be 2-D"),
    (dict(x=randn(8, 6).t()), "x must be contiguous"),
    (dict(ln_weight=torch.ones(7)), "ln_weight must have shape"),
    (dict(ln_weight=torch.ones(8, dtype=torch.float64)), "ln_weight must have x's dtype"),
    (dict(ln_bias=torch.ones(16)[::2]), "ln_bias must be contiguous"),
    (dict(weight=randn(4, 9)), "weight must have shape"),
    (dict(weight=randn(4, 8, dtype=torch.bfloat16)), "weight must have dtype"),
    (dict(bias=randn(5)), "bias must have shape"),
    (dict(residual=randn(6, 5)), "residual must have shape"),
    (dict(norm="batch"), "norm must be"),
    (dict(activation="tanh"), "activation must be"),
    (dict(input_activation="elu"), "input_activation must be"),
    (dict(dropout_p=0.5), "seed must be given"),
    (dict(dropout_p=0.5, seed=torch.tensor(1.0)), "seed must have dtype"),
    (dict(dropout_p=1.0, seed=torch.tensor(1)), "dropout_p must be in"),
    (dict(norm="rms"), "ln_bias must be None for norm='rms'"),
    (dict(norm="none", ln_bias=None), "ln_weight must be None for norm='none'"),
    (dict(eps=-1.0), "eps must be"),
])
def test_ln_linear_bad_input(change, needle):
    args = _good_ln_linear_args()
    args.update(change)
    with pytest.raises(ValueError, match=needle):
        get_op("ln_linear", "native")(*args.values())


def test_norm_ops_bad_input():
    x, w = randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="norm must be 'layer' or 'rms'"):
        get_op("layer_norm", "native")(x, w, None, 1e-5, "none")
    with pytest.raises(ValueError, match="residual must have shape"):
        get_op("add_layer_norm", "native")(x, randn(4, 9), w, None, 1e-5, 1.0, "layer")
    _, mean, rstd = get_op("layer_norm", "native")(x, w, None, 1e-5, "layer")
    bwd = get_op("layer_norm_backward", "native")
    with pytest.raises(ValueError, match="rstd must have dtype"):
        bwd(x, x, w, None, mean, rstd.double(), None, "layer", [True, True, False])
    with pytest.raises(ValueError, match="mean must have shape"):
        bwd(x, x, w, None, mean[:3], rstd, None, "layer", [True, True, False])
    with pytest.raises(ValueError, match="grad_y must have shape"):
        bwd(x[:3], x, w, None, mean, rstd, None, "layer", [True, True, False])
    with pytest.raises(ValueError, match="output_mask must have 3 entries"):
        bwd(x, x, w, None, mean, rstd, None, "layer", [True, True])
    with pytest.raises(ValueError, match="preact must have shape"):
        get_op("ln_linear_backward", "native")(randn(4, 3), x, w, None, randn(3, 8), mean, rstd,
                                            randn(0), None, "layer", "none", "gelu", 0.0,
                                            [True] * 5)


# ------------------------------------------------------------------------ op registration

def _opcheck_args():
    x, lw, lb = randn(9, 24, mean=1.0), randn(24, mean=1.0), randn(24)
    w, b, r = randn(10, 24, std=0.2), randn(10), randn(9, 10)
    seed = torch.tensor(42, dtype=torch.int64)
    _, mean, rstd = get_op("layer_norm", "native")(x, lw, lb, 1e-5, "layer")
    _, _, _, preact = get_op("ln_linear", "native")(x, lw, lb, w, b, r, seed, 1e-5, "layer", "gelu",
                                                 "silu", 1.5, 0.1)
    return {
        "layer_norm": (x.requires_grad_(), lw.requires_grad_(), lb.requires_grad_(), 1e-5, "layer"),
        "layer_norm_backward": (randn(9, 24), x.detach(), lw.detach(), lb.detach(), mean, rstd,
                                randn(9, 24), "layer", [True, True, True]),
        "add_layer_norm": (x.detach().clone().requires_grad_(), randn(9, 24).requires_grad_(),
                           lw.detach().clone().requires_grad_(), None, 1e-5, 2.0, "rms"),
        "ln_linear": (x.detach().clone().requires_grad_(), lw.detach().clone().requires_grad_(),
                      lb.detach().clone().requires_grad_(), w.requires_grad_(),
                      b.requires_grad_(), r.requires_grad_(), seed, 1e-5, "layer", "gelu",
                      "silu", 1.5, 0.1),
        "ln_linear_backward": (randn(9, 10), x.detach(), lw.detach(), lb.detach(), w.detach(),
                               mean, rstd, preact, seed, "layer", "gelu", "silu", 0.1,
                               [True] * 5),
    }


@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_backward", "add_layer_norm",
                                "ln_linear", "ln_linear_backward"])
def test_opcheck(op):
    torch.library.opcheck(get_op(op, "native"), _opcheck_args()[op])


# ----------------------------------------------------------------- instruction-set builds

# A fresh process's ln_linear forward+backward (and an RMSNorm) against the reference.
_SUBPROCESS_SCRIPT = r"""
import torch, magneto_kernels as mk
from magneto_kernels import _C, reference
{check}
torch.manual_seed(0)
rows, cols = {rows}, {cols}
x = (torch.randn(rows, cols) * 2 + 1).requires_grad_()
lw, lb = torch.randn(cols).requires_grad_(), torch.randn(cols).requires_grad_()
w, r = (torch.randn(47, cols) * 0.1).requires_grad_(), torch.randn(rows, 47)
b = torch.randn(47).requires_grad_()
dy = torch.randn(rows, 47)
outs = []
for backend in ("cpu", "reference"):
    torch.manual_seed(1)
    y = mk.ln_linear(x, lw, lb, w, None, residual=r, input_activation="gelu",
                     activation="silu", dropout_p=0.3, backend=backend)
    outs.append([y] + list(torch.autograd.grad(y, (x, lw, lb, w), dy)))
    # fc2's case: the residual folded into the GEMM's output (or added after it), with a bias
    y = mk.ln_linear(x, lw, lb, w, b, residual=r, alpha=0.7, input_activation="gelu",
                     backend=backend)
    outs[-1] += [y] + list(torch.autograd.grad(y, (x, lw, lb, w, b), dy))
    outs[-1].append(mk.layer_norm(x, lw, None, norm="rms", backend=backend))
for a, b in zip(*outs):
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-5, err
print("ok")
"""


def run_subprocess_check(check: str, rows=29, cols=83, **env):
    env = dict(os.environ, OMP_NUM_THREADS="2", **env)
    script = _SUBPROCESS_SCRIPT.format(check=check, rows=rows, cols=cols)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_other_instruction_set_builds(isa):
    """The narrower builds of the kernels (chosen by MAGNETO_CPU_ISA) agree with the reference;
    the widest one the CPU supports runs in every other test."""
    if isa == "avx2" and _C.cpu_capability() == "default":
        pytest.skip("the CPU has no AVX2")
    run_subprocess_check(f"assert _C.cpu_capability() == {isa!r}, _C.cpu_capability()",
                         MAGNETO_CPU_ISA=isa)


# ------------------------------------------------------------- GEMM engine and workspace

ENGINES = ["aten", "onednn"]


def use_engine(engine):
    """Selects a CPU GEMM engine for one test (restore_engine puts the user's choice back)."""
    _C._set_cpu_gemm_engine(engine)
    try:
        assert _C.cpu_gemm_engine() == engine
    except RuntimeError as e:  # MAGNETO_CPU_GEMM=onednn where oneDNN cannot run
        pytest.skip(f"oneDNN matmul not usable here: {e}")


@pytest.fixture
def restore_engine():
    yield
    _C._set_cpu_gemm_engine(os.environ.get("MAGNETO_CPU_GEMM", "auto"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_engine_layouts(engine, accumulate, restore_engine):
    """The three GEMMs of ln_linear (H @ W^T, dz @ W, dz^T @ H: plain and transposed operands)
    against float64, with and without accumulating into the output; empty sums give zeros."""
    use_engine(engine)
    h, w, dz = randn(37, 53, mean=0.5), randn(29, 53, std=0.2), randn(37, 29, mean=-0.3)
    for a, b in ((h, w.t()), (dz, w), (dz.t(), h)):
        start = randn(a.shape[0], b.shape[1])
        out = start.clone() if accumulate else torch.full_like(start, float("nan"))
        _C._cpu_gemm(a, b, out, accumulate)
        want = a.double() @ b.double() + (start.double() if accumulate else 0)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    empty = torch.full((4, 3), float("nan"))
    _C._cpu_gemm(randn(4, 0), randn(0, 3), empty, False)
    assert torch.equal(empty, torch.zeros(4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("engine", ENGINES)
def test_ln_linear_with_each_gemm_engine(engine, dtype, restore_engine):
    use_engine(engine)
    case = ("layer", "gelu", "silu", True, 1.5, 0.0, True)
    fn, tensors, grads, kwargs = _ln_linear_case(case, dtype)
    check_all(run_three(fn, tensors, grads, seed=5, **kwargs), atol=1e-5, reduction_rows=37)


def test_bad_gemm_engine_name(restore_engine):
    with pytest.raises(ValueError, match="MAGNETO_CPU_GEMM"):
        _C._set_cpu_gemm_engine("mkl")


def test_without_workspace():
    """MAGNETO_CPU_WORKSPACE_MB=0: forward and backward allocate their GEMM operand per call."""
    run_subprocess_check("", MAGNETO_CPU_WORKSPACE_MB="0")


def test_row_blocked_forward():
    """An operand of 1000×300 fp32 (1.14 MiB) through a 1 MiB workspace: the forward runs in two
    row blocks (873 + 127 rows), the backward allocates its operand."""
    run_subprocess_check("", rows=1000, cols=300, MAGNETO_CPU_WORKSPACE_MB="1")


# ------------------------------------------------------------------- agreement with Triton

def test_cpu_agrees_with_triton_interpreter():
    problem = mk.available_backends("cpu")["triton"]
    if problem is not None:
        pytest.skip(f"Triton backend unavailable on CPU: {problem}")
    x = randn(19, 40, mean=1.0, std=2.0)
    lw, lb = randn(40, mean=1.0, std=0.2), randn(40, std=0.3)
    w, b, r = randn(24, 40, std=0.15), randn(24), randn(19, 24)
    dy = randn(19, 24, mean=0.2)
    results = {}
    for backend in ("cpu", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lw, lb, w, b, r)]
        torch.manual_seed(11)
        y = mk.ln_linear(*leaves[:5], residual=leaves[5], input_activation="gelu",
                         activation="gelu_tanh", alpha=1.5, dropout_p=0.25, backend=backend)
        z, s = mk.add_layer_norm(leaves[0], leaves[0] * 0.5, leaves[1], leaves[2], alpha=0.8,
                                 backend=backend)
        results[backend] = [y, z, s, *torch.autograd.grad(
            (y * dy).sum() + (z * z).sum(), leaves)]
    # A different dropout mask would change whole elements of y and of every gradient.
    for i, (c, t) in enumerate(zip(results["cpu"], results["triton"])):
        torch.testing.assert_close(c, t, rtol=2e-5, atol=2e-5, msg=lambda m: f"output {i}: {m}")


def test_gelu_accuracy():
    """The C++ GELU (A&S erf with a shared fast exp) and its derivative, over [-10, 10] and a
    normal sample, are no less accurate than torch's own fp32 F.gelu against float64. ln_linear
    without a norm and with a 1×1 identity weight returns gelu(x) exactly through the GEMM."""
    x = torch.cat([torch.linspace(-10, 10, 20001), randn(20000, std=3.0)]).reshape(-1, 1)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    ours = mk.ln_linear(xs[0], None, None, torch.ones(1, 1), None, input_activation="gelu",
                        backend="cpu")
    theirs = torch.nn.functional.gelu(xs[1])
    ref = torch.nn.functional.gelu(xs[2].double())
    grads = [torch.autograd.grad(y.sum(), t)[0] for y, t in zip((ours, theirs, ref), xs)]
    for name, a, b, r in (("gelu", ours, theirs, ref), ("gelu'", *grads)):
        err, torch_err = ((v.double() - r).detach() for v in (a, b))
        assert err.abs().max() <= 1.05 * torch_err.abs().max(), name
        assert err.norm() <= 1.05 * torch_err.norm(), name


def test_zero_rows():
    x = randn(0, 16).requires_grad_()
    lw, w, b = (t.requires_grad_() for t in (randn(16, mean=1.0), randn(8, 16), randn(8)))
    out = mk.ln_linear(x, lw, None, w, b, activation="gelu", dropout_p=0.1, backend="cpu")
    assert out.shape == (0, 8)
    (out * 2).sum().backward()
    for t in (lw, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t)), "a sum over no rows is zero"
    y = mk.layer_norm(randn(0, 5), torch.ones(5), None, backend="cpu")
    assert y.shape == (0, 5)
