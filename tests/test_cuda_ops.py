"""The CUDA C++ kernels (``backend="cuda"``, csrc/cuda) against the float64 reference.

On a CPU-only machine only ``test_nvcc_compile_check`` runs: it compiles every csrc/cuda/*.cu
for sm_80 and sm_90a and fails on errors, warnings or register spills (tools/check_cuda.py);
it is skipped, saying why, when nvcc is absent. Everything else needs a GPU (``gpu`` marker,
run by bench/gpu_check.sh): the three public ops, forward and every gradient, fp32/bf16/fp16,
odd widths, widths that take each kernel path (warp per row, block per row, the wide Welford
and column-partials kernels), non-zero-mean rows, the dropout mask bit for bit against
``reference.dropout_mask``, the scalar path for misaligned tensors, and deterministic
parameter gradients.

Closeness (DESIGN.md §4): ``‖out − ref64‖ ≤ max(RTOL·‖ref64‖, 2·‖torch − ref64‖) + atol`` where
``torch`` is PyTorch's own computation in the same dtype (the reference run on the same
low-precision inputs). Outputs are NaN-poisoned before the kernels write them.
"""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import magneto_kernels as mk
from magneto_kernels import reference
from magneto_kernels.backends import available_backends

from conftest import randn
from conftest import assert_close_to_reference as check

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = ("none", "gelu", "gelu_tanh", "relu", "silu")


def _load_check_cuda():
    spec = importlib.util.spec_from_file_location("check_cuda", ROOT / "tools" / "check_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nvcc_compile_check():
    """Every .cu compiles for sm_80 and sm_90a without warnings and without register spills."""
    check_cuda = _load_check_cuda()
    if check_cuda.find_nvcc() is None:
        pytest.skip("nvcc not found (PATH, $NVCC, $CUDA_HOME): the CUDA compile check needs it")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "check_cuda.py")],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "norm_forward_rows" in proc.stdout and "linear_epilogue_kernel" in proc.stdout


# ------------------------------------------------------------------------------------ GPU only

@pytest.fixture(autouse=True)
def poison_outputs(request):
    """NaN-fill outputs and workspaces before the kernels write them (GPU tests only)."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    from magneto_kernels import _C
    _C._set_poison_outputs(True)
    yield
    _C._set_poison_outputs(False)


def compare(ours_fn, ref_fn, inputs, dtype, names):
    """Outputs and the gradients of every given input: CUDA vs float64 vs same-dtype torch."""
    def leaves(cast):
        return [None if t is None else cast(t).detach().clone().requires_grad_(True)
                for t in inputs]

    ours, same, ref = leaves(lambda t: t), leaves(lambda t: t), leaves(lambda t: t.double())
    outs = [ours_fn(*ours), ref_fn(*same), ref_fn(*ref)]
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    gen = torch.Generator().manual_seed(1)
    grads = [randn(*o.shape, dtype=torch.float64, generator=gen).cuda() for o in outs[2]]
    for i, (a, b, c) in enumerate(zip(*outs)):
        check(a, c, b, f"output {i}", dtype)
    wanted = [i for i, t in enumerate(inputs) if t is not None]

    def grads_of(o, args):
        return torch.autograd.grad(o, [args[i] for i in wanted],
                                   [g.to(t.dtype) for g, t in zip(grads, o)])

    for i, a, b, c in zip(wanted, grads_of(outs[0], ours), grads_of(outs[1], same),
                          grads_of(outs[2], ref)):
        check(a, c, b, f"grad of {names[i]}", dtype, atol=1e-6 * math.sqrt(c.numel()))


@pytest.mark.gpu
def test_cuda_backend_is_available():
    """On a GPU machine a missing CUDA build is a failure, not a reason to test nothing."""
    assert available_backends("cuda")["cuda"] is None, available_backends("cuda")["cuda"]


# Widths that take each path: warp per row (1, 33, 250), block per row (1000, 4097),
# backward's wide kernels (8200 > 8192), forward's wide kernel for fp32 (16390 > 16384) and
# every dtype (65536 > 32768). 3000 rows of 1000: more rows than backward's register kernel
# has row groups in its grid (a few blocks per SM), so each block loops over rows,
# accumulating dweight/dbias across iterations and alternating its reduction buffers.
NORM_SHAPES = [(5, 1), (7, 33), (64, 250), (9, 1000), (3000, 1000), (3, 4097), (3, 8200),
               (2, 16390), (2, 65536)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_layer_norm(shape, norm, dtype):
    rows, width = shape
    param_dtype = torch.float32 if width % 2 else dtype  # both parameter dtypes get covered
    x = randn(rows, width, dtype=dtype, mean=3.0, std=2.0, device="cuda")
    w = randn(width, dtype=param_dtype, mean=1.0, std=0.3, device="cuda")
    b = (randn(width, dtype=param_dtype, mean=0.2, std=0.5, device="cuda")
         if norm == "layer" else None)
    compare(lambda x, w, b: mk.layer_norm(x, w, b, 1e-5, norm=norm, backend="cuda"),
            lambda x, w, b: reference.layer_norm(x, w, b, 1e-5, norm=norm),
            [x, w, b], dtype, ["x", "weight", "bias"])


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_layer_norm_without_affine_large_mean(norm):
    x = randn(2, 3, 777, mean=300.0, std=0.5, device="cuda")
    compare(lambda x: mk.layer_norm(x, None, None, 1e-6, norm=norm, backend="cuda"),
            lambda x: reference.layer_norm(x, None, None, 1e-6, norm=norm), [x],
            torch.float32, ["x"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,shape,alpha", [("layer", (33, 127), 1.0), ("rms", (16, 1024), 2.5),
                                              ("layer", (3, 40000), 0.7)])
def test_add_layer_norm(norm, shape, alpha, dtype):
    x = randn(*shape, dtype=dtype, mean=0.5, device="cuda")
    res = randn(*shape, dtype=dtype, mean=-1.0, std=2.0, device="cuda")
    w = randn(shape[1], dtype=dtype, mean=1.0, std=0.2, device="cuda")
    b = randn(shape[1], dtype=dtype, device="cuda") if norm == "layer" else None
    compare(lambda x, r, w, b: mk.add_layer_norm(x, r, w, b, 1e-5, alpha=alpha, norm=norm,
                                                 backend="cuda"),
            lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, 1e-5, alpha=alpha, norm=norm),
            [x, res, w, b], dtype, ["x", "residual", "weight", "bias"])


# (norm, input_activation, activation, residual alpha or None, dropout_p, bias)
LN_LINEAR_CASES = [
    ("layer", "none", "none", None, 0.0, True),
    ("layer", "none", "gelu", None, 0.0, True),          # fc1
    ("layer", "gelu", "none", 1.0, 0.0, True),           # fc2: act(u) -> LN -> W2, residual
    ("rms", "silu", "gelu_tanh", 0.5, 0.2, False),
    ("layer", "relu", "silu", 2.0, 0.1, True),
    ("none", "gelu_tanh", "relu", None, 0.3, True),
    ("none", "none", "none", 1.0, 0.0, False),
]


def _ln_linear_fns(norm, in_act, act, alpha, p, seed=3):
    def run(backend):
        def fn(x, ln_w, ln_b, w, b, r):
            torch.manual_seed(seed)  # the same dropout seed for every run
            return mk.ln_linear(x, ln_w, ln_b, w, b, norm="layer" if norm == "none" else norm,
                                input_activation=in_act, activation=act, residual=r,
                                alpha=1.0 if alpha is None else alpha, dropout_p=p,
                                backend=backend)
        return fn
    return run("cuda"), run("reference")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LN_LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("sizes", [(37, 65, 129), (4, 9000, 24)], ids=["odd", "wide_k"])
def test_ln_linear(sizes, case, dtype):
    norm, in_act, act, alpha, p, has_bias = case
    rows, k, n = sizes
    x = randn(rows, k, dtype=dtype, mean=1.5, device="cuda")
    ln_w = None if norm == "none" else randn(k, dtype=dtype, mean=1.0, std=0.3, device="cuda")
    ln_b = randn(k, dtype=dtype, std=0.3, device="cuda") if norm == "layer" else None
    w = randn(n, k, dtype=dtype, std=k ** -0.5, device="cuda")
    b = randn(n, dtype=dtype, mean=0.1, device="cuda") if has_bias else None
    r = None if alpha is None else randn(rows, n, dtype=dtype, mean=-0.5, device="cuda")
    ours, ref = _ln_linear_fns(norm, in_act, act, alpha, p)
    compare(ours, ref, [x, ln_w, ln_b, w, b, r], dtype,
            ["x", "ln_weight", "ln_bias", "weight", "bias", "residual"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [LN_LINEAR_CASES[2], LN_LINEAR_CASES[3]],
                         ids=lambda c: "-".join(map(str, c)))
def test_ln_linear_wide_rows(case, dtype):
    """in_features 40000: the prologue takes the forward's wide (Welford) kernel, whose input
    activation is a runtime switch, in every dtype."""
    test_ln_linear((3, 40000, 16), case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_bit_identical_to_reference(p):
    rows, k, n = 300, 64, 517
    x = randn(rows, k, mean=1.0, device="cuda")
    w = randn(n, k, device="cuda")
    torch.manual_seed(11)
    y = mk.ln_linear(x, None, None, w, dropout_p=p, backend="cuda")
    torch.manual_seed(11)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cuda")  # as ops._draw_seed
    keep = reference.dropout_mask(seed, (rows, n), p)
    assert torch.equal(y != 0, keep)
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(y, (x @ w.T) * keep / (1 - p), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [256, 4096, 40000])
def test_misaligned_tensors_take_the_scalar_path(dtype, width):
    """Views 2 or 4 bytes off a 16-byte boundary give bitwise the vector path's results."""
    rows = 6
    buf = randn(rows * width + 1, dtype=dtype, mean=2.0, device="cuda")
    x_odd = buf[1:].view(rows, width)
    x = x_odd.clone()
    wbuf = randn(width + 1, dtype=dtype, mean=1.0, device="cuda")
    w_odd, w = wbuf[1:], wbuf[1:].clone()
    dy = randn(rows, width, dtype=dtype, device="cuda")
    outs = []
    for xi, wi in ((x, w), (x_odd, w_odd)):
        xi = xi.detach().requires_grad_(True)
        wi = wi.detach().requires_grad_(True)
        y = mk.layer_norm(xi, wi, None, backend="cuda")
        y.backward(dy)
        outs.append((y.detach(), xi.grad, wi.grad))
    for a, b, name in zip(outs[0], outs[1], ("y", "dx", "dweight")):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("width", [768, 20000])
def test_parameter_gradients_are_deterministic(width):
    x = randn(4096 if width < 8192 else 64, width, dtype=torch.bfloat16, mean=1.0, device="cuda")
    w = randn(width, mean=1.0, device="cuda")
    b = randn(width, device="cuda")
    dy = randn(*x.shape, dtype=torch.bfloat16, device="cuda")
    grads = []
    for _ in range(2):
        wi, bi = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        mk.layer_norm(x, wi, bi, backend="cuda").backward(dy)
        grads.append((wi.grad, bi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.gpu
def test_zero_rows():
    """An empty batch (whose tensors have null data pointers) gives empty outputs and zero
    parameter gradients, forward and backward, for every op."""
    x = randn(0, 16, device="cuda").requires_grad_()
    lw, w, b = (t.requires_grad_() for t in (randn(16, mean=1.0, device="cuda"),
                                             randn(8, 16, device="cuda"),
                                             randn(8, device="cuda")))
    out = mk.ln_linear(x, lw, None, w, b, activation="gelu", dropout_p=0.1, backend="cuda")
    assert out.shape == (0, 8)
    (out * 2).sum().backward()
    for t in (lw, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t)), "a sum over no rows is zero"
    lb = randn(16, device="cuda").requires_grad_()
    y, s = mk.add_layer_norm(x, torch.zeros_like(x), lw, lb, backend="cuda")
    assert y.shape == s.shape == (0, 16)
    lw.grad = None
    mk.layer_norm(x, lw, lb, backend="cuda").sum().backward()
    assert torch.equal(lw.grad, torch.zeros_like(lw)) and torch.equal(lb.grad, torch.zeros_like(lb))
