"""The Triton op family (``backend="triton"``) against the float64 reference, on CPU under
TRITON_INTERPRET=1: forward and every gradient, layer/rms/none norms, all activations, residual,
dropout, fp32/bf16/fp16, odd and wide sizes; plus Philox bit-compatibility, the op contract
(output_mask, empties), saved-tensor bytes, opcheck and torch.compile.

Closeness (DESIGN.md §4): ‖out − ref64‖ ≤ max(RTOL·‖ref64‖, 2·‖torch − ref64‖) + atol, where
``torch`` is PyTorch's own computation of the same op in the same dtype (the reference module
run on the low-precision inputs). Every output buffer is NaN-poisoned before the kernels write.
"""
import math

import pytest
import torch

import magneto_kernels as mk
from magneto_kernels import reference
from magneto_kernels.library import get_op

from conftest import randn
from conftest import assert_close_to_reference as check

triton_kernels = pytest.importorskip("magneto_kernels.triton")
from magneto_kernels.triton import common, philox as triton_philox  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = ("none", "gelu", "gelu_tanh", "relu", "silu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_case(fn_triton, fn_ref, inputs, dtype, names, grad_seed=0):
    """Run fn on (triton, same-dtype torch, float64) inputs with the same upstream gradient and
    compare every output and every input gradient. ``inputs`` holds tensors or None."""
    ours = [None if t is None else leaf(t) for t in inputs]
    same = [None if t is None else leaf(t) for t in inputs]
    ref = [None if t is None else leaf(t.double()) for t in inputs]
    out_ours = fn_triton(*ours)
    out_same = fn_ref(*same)
    out_ref = fn_ref(*ref)
    if isinstance(out_ours, torch.Tensor):
        out_ours, out_same, out_ref = (out_ours,), (out_same,), (out_ref,)
    gen = torch.Generator().manual_seed(grad_seed)
    grads = [randn(*o.shape, dtype=torch.float64, generator=gen) for o in out_ref]
    errors = {}
    for i, (a, b, c) in enumerate(zip(out_ours, out_same, out_ref)):
        errors[f"out{i}"] = check(a, c, b, f"output {i}", dtype)
    leaves = [i for i, t in enumerate(inputs) if t is not None]

    def grads_of(outs, args):
        return torch.autograd.grad(outs, [args[i] for i in leaves],
                                   [g.to(device=o.device, dtype=o.dtype)
                                    for g, o in zip(grads, outs)])

    for i, a, b, c in zip(leaves, grads_of(out_ours, ours), grads_of(out_same, same),
                          grads_of(out_ref, ref)):
        errors[names[i]] = check(a, c, b, f"grad of {names[i]}", dtype,
                                 atol=1e-6 * math.sqrt(c.numel()))
    return errors


# --------------------------------------------------------------------------------------- Philox

@pytest.mark.parametrize("seed", [0, 1234567, 2**62 - 3, 2**40 + 17])
def test_philox_matches_reference_for_64_bit_indices(seed):
    seed_t = torch.tensor(seed, dtype=torch.int64)
    index = torch.cat([torch.arange(0, 3000, dtype=torch.int64),
                       torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 12345,
                                     2**45 + 7, 2**62 + 99], dtype=torch.int64)])
    ours = triton_philox.philox(seed_t, index)
    assert torch.equal(ours, reference.philox(seed_t, index))
    assert ours.unique().numel() > 2900  # a real stream, not a constant


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_matches_reference(p):
    rows, k, n = 23, 17, 45
    x = randn(rows, k, mean=1.0)
    w = randn(n, k)
    torch.manual_seed(7)
    y = mk.ln_linear(x, None, None, w, dropout_p=p, backend="triton")
    torch.manual_seed(7)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    keep = reference.dropout_mask(seed, (rows, n), p)
    assert torch.equal(y != 0, keep)
    assert 0 < keep.sum() < keep.numel()
    torch.manual_seed(7)
    y_ref = mk.ln_linear(x, None, None, w, dropout_p=p, backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- layer_norm

NORM_SHAPES = [(1, 1), (3, 37), (37, 199), (3, 1000), (2, 65536)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_layer_norm(shape, norm, dtype):
    rows, width = shape
    param_dtype = torch.float32 if width % 2 else dtype   # both param dtypes get covered
    x = randn(rows, width, dtype=dtype, mean=3.0, std=2.0)
    w = randn(width, dtype=param_dtype, mean=1.0, std=0.3)
    b = randn(width, dtype=param_dtype, mean=0.2, std=0.5) if norm == "layer" else None
    run_case(lambda x, w, b: mk.layer_norm(x, w, b, 1e-5, norm=norm, backend="triton"),
             lambda x, w, b: reference.layer_norm(x, w, b, 1e-5, norm=norm),
             [x, w, b], dtype, ["x", "weight", "bias"])


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_layer_norm_without_affine_and_batch_dims(norm):
    x = randn(2, 3, 45, mean=-4.0, std=0.5)
    run_case(lambda x: mk.layer_norm(x, None, None, 1e-6, norm=norm, backend="triton"),
             lambda x: reference.layer_norm(x, None, None, 1e-6, norm=norm),
             [x], torch.float32, ["x"])


def test_layer_norm_large_mean_fp32():
    """|mean|/std = 1e3: as accurate as PyTorch's own fp32 LayerNorm (within 2x)."""
    x = randn(8, 1000, mean=1000.0, std=1.0)
    w = randn(1000, mean=1.0, std=0.1)
    b = randn(1000, std=0.1)
    run_case(lambda x, w, b: mk.layer_norm(x, w, b, backend="triton"),
             lambda x, w, b: reference.layer_norm(x, w, b), [x, w, b], torch.float32,
             ["x", "weight", "bias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,shape", [("layer", (37, 199)), ("rms", (5, 1000)),
                                        ("layer", (2, 65536))])
def test_add_layer_norm(norm, shape, dtype):
    rows, width = shape
    x = randn(rows, width, dtype=dtype, mean=1.0)
    res = randn(rows, width, dtype=dtype, mean=-2.0, std=3.0)
    w = randn(width, mean=1.0, std=0.3)
    b = randn(width, std=0.5) if norm == "layer" else None
    alpha = 0.81
    # Both outputs feed the loss, so dx also carries the skip-path gradient (grad_accum).
    run_case(lambda x, r, w, b: mk.add_layer_norm(x, r, w, b, alpha=alpha, norm=norm,
                                                  backend="triton"),
             lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, alpha=alpha, norm=norm),
             [x, res, w, b], dtype, ["x", "residual", "weight", "bias"])


def test_layer_norm_backward_accumulates_and_is_deterministic():
    x = randn(37, 300, mean=2.0)
    w = randn(300, mean=1.0)
    b = randn(300)
    dy = randn(37, 300)
    acc = randn(37, 300)
    y, mean, rstd = get_op("layer_norm", "triton")(x, w, b, 1e-5, "layer")
    op = get_op("layer_norm_backward", "triton")
    dx0, dw0, db0 = op(dy, x, w, b, mean, rstd, None, "layer", [True, True, True])
    dx1, dw1, db1 = op(dy, x, w, b, mean, rstd, acc, "layer", [True, True, True])
    torch.testing.assert_close(dx1, dx0 + acc, rtol=1e-6, atol=1e-6)
    assert torch.equal(dw0, dw1) and torch.equal(db0, db1)     # bit-identical: no atomics
    dx2, dw2, db2 = op(dy, x, w, b, mean, rstd, None, "layer", [False, True, False])
    assert dx2.shape == (0,) and db2.shape == (0,) and torch.equal(dw2, dw0)


# ------------------------------------------------------------------------------------ ln_linear

# (rows, in, out, norm, input_activation, activation, residual, dropout_p, bias, ln params dtype)
LN_LINEAR_CASES = [
    (37, 199, 61, "layer", "none", "none", False, 0.0, True, "fp32"),
    (3, 37, 199, "layer", "gelu", "gelu", True, 0.0, True, "same"),
    (199, 37, 3, "rms", "none", "relu", False, 0.2, False, "fp32"),
    (1, 1, 1, "layer", "none", "silu", True, 0.0, True, "fp32"),
    (5, 1000, 3, "layer", "silu", "gelu_tanh", False, 0.0, True, "same"),
    (37, 64, 37, "none", "gelu_tanh", "none", True, 0.3, True, "fp32"),
    (37, 61, 45, "rms", "relu", "gelu", True, 0.5, True, "same"),
    (2, 3, 5, "none", "none", "silu", False, 0.0, False, "fp32"),
    (2, 9000, 3, "layer", "gelu", "none", True, 0.0, True, "fp32"),   # chunked row statistics
]


def _ln_linear_inputs(rows, k, n, norm, residual, bias, param, dtype, mean=1.5):
    p_dtype = torch.float32 if param == "fp32" else dtype
    x = randn(rows, k, dtype=dtype, mean=mean, std=2.0)
    ln_w = None if norm == "none" else randn(k, dtype=p_dtype, mean=1.0, std=0.3)
    ln_b = randn(k, dtype=p_dtype, mean=0.1, std=0.3) if norm == "layer" else None
    w = randn(n, k, dtype=dtype, std=1.0 / math.sqrt(k))
    b = randn(n, dtype=dtype, mean=0.1, std=0.2) if bias else None
    r = randn(rows, n, dtype=dtype, mean=-0.5) if residual else None
    return [x, ln_w, ln_b, w, b, r]


def _ln_linear_fns(norm, in_act, act, p, alpha, seed):
    kwargs = dict(eps=1e-5, norm="layer" if norm == "none" else norm, input_activation=in_act,
                  activation=act, alpha=alpha, dropout_p=p)

    def ours(x, ln_w, ln_b, w, b, r):
        torch.manual_seed(seed)
        return mk.ln_linear(x, ln_w, ln_b, w, b, residual=r, backend="triton", **kwargs)

    def ref(x, ln_w, ln_b, w, b, r):
        torch.manual_seed(seed)
        return mk.ln_linear(x, ln_w, ln_b, w, b, residual=r, backend="reference", **kwargs)

    return ours, ref


LN_LINEAR_NAMES = ["x", "ln_weight", "ln_bias", "weight", "bias", "residual"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LN_LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ln_linear(case, dtype):
    rows, k, n, norm, in_act, act, residual, p, bias, param = case
    inputs = _ln_linear_inputs(rows, k, n, norm, residual, bias, param, dtype)
    ours, ref = _ln_linear_fns(norm, in_act, act, p, 0.7 if residual else 1.0, seed=rows + k)
    run_case(ours, ref, inputs, dtype, LN_LINEAR_NAMES)


def test_ln_linear_batch_dims_and_large_mean():
    """Normalise-on-load keeps the unfused numerics: |mean|/std = 1e3 still matches PyTorch.

    (There both lose digits to the fp32 rounding of each row's mean, a per-row error: 64 rows
    make the comparison of error norms stable.)"""
    x = randn(2, 32, 96, mean=1000.0, std=1.0)
    inputs = [x, randn(96, mean=1.0, std=0.2), randn(96, std=0.2), randn(40, 96, std=0.1),
              randn(40), None]
    ours, ref = _ln_linear_fns("layer", "none", "gelu", 0.0, 1.0, seed=0)
    run_case(ours, ref, inputs, torch.float32, LN_LINEAR_NAMES)


def test_ln_linear_partial_gradients():
    """Only some inputs need gradients: the others come back as None, the rest are right."""
    x, ln_w, ln_b, w, b, _ = _ln_linear_inputs(19, 33, 21, "layer", False, True, "fp32",
                                               torch.float32)
    ln_w.requires_grad_()
    w.requires_grad_()
    y = mk.ln_linear(x, ln_w, ln_b, w, b, activation="gelu", backend="triton")
    dy = randn(19, 21)
    g_lnw, g_w = torch.autograd.grad(y, [ln_w, w], dy)
    ln_w64, w64 = leaf(ln_w.double()), leaf(w.double())
    y64 = reference.ln_linear(x.double(), ln_w64, ln_b.double(), w64, b.double(),
                              activation="gelu")
    r_lnw, r_w = torch.autograd.grad(y64, [ln_w64, w64], dy.double())
    torch.testing.assert_close(g_lnw.double(), r_lnw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_w.double(), r_w, rtol=1e-5, atol=1e-5)


def test_ln_linear_backward_op_contract():
    x, ln_w, ln_b, w, _, _ = _ln_linear_inputs(7, 9, 5, "layer", False, False, "fp32",
                                               torch.bfloat16)
    out, mean, rstd, preact = get_op("ln_linear", "triton")(
        x, ln_w, ln_b, w, None, None, None, 1e-5, "layer", "none", "none", 1.0, 0.0)
    assert preact.shape == (0,) and mean.shape == (7,) and rstd.dtype == torch.float32
    op = get_op("ln_linear_backward", "triton")
    dy = randn(7, 5, dtype=torch.bfloat16)
    dx, dlnw, dlnb, dw, db = op(dy, x, ln_w, ln_b, w, mean, rstd, preact, None, "layer", "none",
                                "none", 0.0, [False, True, False, False, True])
    assert dx.shape == dlnb.shape == dw.shape == (0,)
    assert dlnw.shape == (9,) and dlnw.dtype == torch.float32
    assert db.dtype == torch.bfloat16
    torch.testing.assert_close(db.float(), dy.float().sum(0), rtol=1e-2, atol=1e-2)
    _, mean_r, rstd_r, _ = get_op("ln_linear", "triton")(
        x, ln_w, None, w, None, None, None, 1e-5, "rms", "none", "relu", 1.0, 0.0)
    assert mean_r.shape == (0,) and rstd_r.shape == (7,)


@pytest.mark.parametrize("act,p", [("none", 0.0), ("gelu", 0.0), ("none", 0.1), ("silu", 0.1)])
def test_ln_linear_saved_tensor_bytes(act, p):
    """Autograd keeps x, the row stats and the weights, plus u only with an output activation
    and the 8-byte seed only with dropout: never normalised copies, masks or activations."""
    rows, k, n = 11, 24, 16
    dtype = torch.bfloat16
    x, ln_w, ln_b, w, b, r = _ln_linear_inputs(rows, k, n, "layer", True, True, "fp32", dtype)
    params = [leaf(t) for t in (x, ln_w, ln_b, w, b, r)]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mk.ln_linear(*params[:5], residual=params[5], activation=act, dropout_p=p, alpha=0.5,
                         backend="triton")
    expected = (rows * k * 2          # x (bf16)
                + 2 * rows * 4        # mean and rstd (fp32)
                + 2 * k * 4           # ln_weight and ln_bias (fp32)
                + n * k * 2           # weight (bf16)
                + (rows * n * 2 if act != "none" else 0)   # pre-activation u
                + (8 if p > 0 else 0))                     # the dropout seed
    assert sum(saved) == expected, (saved, expected)
    y.sum().backward()
    assert all(t.grad is not None for t in params)


# --------------------------------------------------------------------------- registration/compile

def _opcheck_args():
    x, ln_w, ln_b, w, b, r = _ln_linear_inputs(6, 10, 7, "layer", True, True, "fp32",
                                               torch.float32)
    seed = torch.tensor(42, dtype=torch.int64)
    out, mean, rstd, preact = get_op("ln_linear", "triton")(
        x, ln_w, ln_b, w, b, r, seed, 1e-5, "layer", "gelu", "gelu", 0.5, 0.2)
    dy = randn(6, 7)
    _, mean_x, rstd_x = get_op("layer_norm", "triton")(x, ln_w, ln_b, 1e-5, "layer")
    return {
        "layer_norm": (x, ln_w, ln_b, 1e-5, "layer"),
        "layer_norm_backward": (randn(6, 10), x, ln_w, ln_b, mean_x, rstd_x, randn(6, 10),
                                "layer", [True, True, True]),
        "add_layer_norm": (x, randn(6, 10), ln_w, None, 1e-5, 0.5, "rms"),
        "ln_linear": (x, ln_w, ln_b, w, b, r, seed, 1e-5, "layer", "gelu", "gelu", 0.5, 0.2),
        "ln_linear_backward": (dy, x, ln_w, ln_b, w, mean, rstd, preact, seed, "layer", "gelu",
                               "gelu", 0.2, [True, True, True, True, True]),
    }


@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_backward", "add_layer_norm",
                                "ln_linear", "ln_linear_backward"])
def test_opcheck(op):
    args = _opcheck_args()[op]
    if not op.endswith("_backward"):   # backward ops are not themselves differentiable
        args = tuple(leaf(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    torch.library.opcheck(get_op(op, "triton"), args)


def test_torch_compile_fullgraph_forward_and_backward():
    def block(x, ln_w, ln_b, w1, w2, g2):
        h = mk.layer_norm(x, ln_w, ln_b, backend="triton")
        u = mk.ln_linear(h, ln_w, ln_b, w1, backend="triton")
        y = mk.ln_linear(u, g2, None, w2, norm="rms", input_activation="gelu", residual=x,
                         alpha=0.9, backend="triton")
        out, s = mk.add_layer_norm(y, x, ln_w, ln_b, backend="triton")
        return out + s

    inputs = [randn(2, 5, 16, mean=1.0), randn(16, mean=1.0), randn(16), randn(16, 16) * 0.3,
              randn(16, 16) * 0.3, randn(16, mean=1.0)]
    eager_in = [leaf(t) for t in inputs]
    comp_in = [leaf(t) for t in inputs]
    expected = block(*eager_in)
    expected.sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(*comp_in)
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
def test_gpu_philox_and_dropout_mask_match_reference():
    """The compiled Philox (uint32 multiply-high on the GPU) draws the reference's bits."""
    seed = torch.tensor(2**62 - 12345, dtype=torch.int64, device="cuda")
    index = torch.cat([torch.arange(0, 1 << 20, dtype=torch.int64, device="cuda"),
                       torch.tensor([2**32 - 1, 2**32, 2**40 + 3], device="cuda")])
    assert torch.equal(triton_philox.philox(seed, index), reference.philox(seed, index))
    x = randn(300, 64, mean=1.0, device="cuda")
    w = randn(500, 64, device="cuda")
    torch.manual_seed(11)
    y = mk.ln_linear(x, None, None, w, dropout_p=0.25, backend="triton")
    torch.manual_seed(11)
    keep = reference.dropout_mask(torch.randint(0, 2**62, (), dtype=torch.int64, device="cuda"),
                                  (300, 500), 0.25)
    assert torch.equal(y != 0, keep)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ln_linear_real_size(dtype):
    """Real shapes on the GPU (bf16/fp16 tensor-core dot), forward and backward."""
    torch.manual_seed(0)
    rows, k, n = 4096, 1024, 3072
    inputs = [t if t is None else t.cuda() for t in
              _ln_linear_inputs(rows, k, n, "layer", True, True, "fp32", dtype)]
    ours, ref = _ln_linear_fns("layer", "none", "gelu", 0.1, 1.0, seed=3)

    run_case(ours, ref, inputs, dtype, LN_LINEAR_NAMES)


@pytest.mark.gpu
@pytest.mark.parametrize("precision,rtol", [("highest", 1e-5), ("high", 5e-4)])
def test_gpu_fp32_ieee_and_tf32(precision, rtol):
    """fp32 follows torch.set_float32_matmul_precision: "highest" → ieee, "high" → tf32."""
    torch.manual_seed(0)
    x, ln_w, ln_b, w, b, _ = [t if t is None else t.cuda() for t in
                              _ln_linear_inputs(1024, 512, 768, "layer", False, True, "fp32",
                                                torch.float32)]
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        y = mk.ln_linear(x, ln_w, ln_b, w, b, backend="triton")
    finally:
        torch.set_float32_matmul_precision(old)
    ref = reference.ln_linear(x.double(), ln_w.double(), ln_b.double(), w.double(), b.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err <= rtol, err
    if precision == "high":
        assert err > 1e-6, "tf32 path looks exact: is input_precision reaching tl.dot?"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_layer_norm_real_size(dtype):
    torch.manual_seed(0)
    x = randn(8192, 4096, dtype=dtype, mean=1.0, device="cuda")
    w = randn(4096, mean=1.0, device="cuda")
    b = randn(4096, device="cuda")
    run_case(lambda x, w, b: mk.layer_norm(x, w, b, backend="triton"),
             lambda x, w, b: reference.layer_norm(x, w, b), [x, w, b], dtype,
             ["x", "weight", "bias"])
