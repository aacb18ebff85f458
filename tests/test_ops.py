"""Every backend's ops against the float64 reference, one suite for all (harness.BACKENDS):
forward and every gradient of layer_norm, add_layer_norm and ln_linear, LayerNorm/RMSNorm/none,
every activation on the input and the output, residual with alpha, dropout, fp32/bf16/fp16, odd
and wide sizes, non-zero-mean rows and gradients; the dropout mask bit for bit against
``reference.dropout_mask``; empty batches; the op contract of each op family (output_mask,
empty statistics, grad_accum, deterministic parameter gradients, strided inputs, opcheck); and the
argument errors, word for word the same on every backend.

What only one backend has (the C++ GEMM engines and instruction-set builds, Triton's Philox and
compile checks, CUDA's kernel paths) is in tests/test_ops_<backend>.py.
"""

import pytest
import torch
from harness import (
    ADD_NORM_CASES,
    DTYPES,
    LN_LINEAR_CASES,
    NORM_NAMES,
    NORM_SHAPES,
    NORM_SPECIAL_CASES,
    TEST_DEVICE,
    assert_close_to_reference,
    backend_params,
    check_ln_linear_case,
    compare_to_reference,
    ln_linear_fn,
    ln_linear_inputs,
    norm_inputs,
    randn,
)

import magneto_kernels as mk
from magneto_kernels import reference
from magneto_kernels.library import get_op

# Each test seeds torch's generator, so its inputs do not depend on which tests ran before.


@pytest.fixture(params=backend_params())
def backend(request):
    with request.param.running() as b:
        torch.manual_seed(0)
        yield b


@pytest.fixture(params=backend_params(kernels_only=True))
def kernels(request):
    """A backend with an op family, whose ops the contract tests call directly."""
    with request.param.running() as b:
        torch.manual_seed(0)
        yield b


def _layer_norm(norm, eps=1e-5):
    return lambda x, weight, bias, backend: mk.layer_norm(
        x, weight, bias, eps, norm=norm, backend=backend
    )


# -------------------------------------------------------------------------------- layer_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_layer_norm(backend, shape, norm, dtype):
    compare_to_reference(
        backend, _layer_norm(norm), norm_inputs(*shape, dtype, norm, backend.device)
    )


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("case", NORM_SPECIAL_CASES)
def test_layer_norm_special(backend, case, norm):
    shape, dtype, mean, std, eps, params = NORM_SPECIAL_CASES[case]
    cols, dev = shape[-1], backend.device
    inputs = {
        "x": randn(*shape, dtype=dtype, mean=mean, std=std, device=dev),
        "weight": None if params is None else randn(cols, mean=1.0, std=0.2, device=dev),
        "bias": (
            randn(cols, std=0.2, device=dev)
            if params == "weight+bias" and norm == "layer"
            else None
        ),
    }
    compare_to_reference(backend, _layer_norm(norm, eps), inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ADD_NORM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_add_layer_norm(backend, case, dtype):
    norm, (rows, cols), alpha, param = case
    p_dtype, dev = torch.float32 if param == "fp32" else dtype, backend.device
    inputs = {
        "x": randn(rows, cols, dtype=dtype, mean=0.5, device=dev),
        "residual": randn(rows, cols, dtype=dtype, mean=-1.0, std=2.0, device=dev),
        "weight": randn(cols, dtype=p_dtype, mean=1.0, std=0.3, device=dev),
        "bias": randn(cols, dtype=p_dtype, std=0.3, device=dev) if norm == "layer" else None,
    }

    # Both outputs carry gradient (the skip path's sum feeds the next sublayer), so dx also
    # takes the grad_accum path.
    def fn(x, residual, weight, bias, backend):
        return mk.add_layer_norm(x, residual, weight, bias, alpha=alpha, norm=norm, backend=backend)

    compare_to_reference(backend, fn, inputs)


@pytest.mark.parametrize("shape", [(300, 72), (37, 300)])
def test_layer_norm_backward_accumulates_and_is_deterministic(kernels, shape):
    rows, cols = shape
    dev = kernels.device
    x = randn(rows, cols, mean=1.0, device=dev)
    w, b = randn(cols, mean=1.0, device=dev), randn(cols, device=dev)
    dy, acc = randn(rows, cols, mean=0.2, device=dev), randn(rows, cols, device=dev)
    _, mean, rstd = get_op("layer_norm", kernels.family)(x, w, b, 1e-5, "layer")
    bwd = get_op("layer_norm_backward", kernels.family)
    dx0, dw0, db0 = bwd(dy, x, w, b, mean, rstd, None, "layer", [True, True, True])
    dx1, dw1, db1 = bwd(dy, x, w, b, mean, rstd, acc, "layer", [True, True, True])
    assert_close_to_reference(dx1, (dx0 + acc).double(), dx0 + acc, "dx with grad_accum")
    torch.testing.assert_close(dx1, dx0 + acc, rtol=1e-6, atol=1e-6)
    assert torch.equal(dw0, dw1) and torch.equal(db0, db1)  # bit-identical: no atomics
    dx2, dw2, db2 = bwd(dy, x, w, b, mean, rstd, None, "layer", [False, True, False])
    assert dx2.shape == (0,) and db2.shape == (0,) and torch.equal(dw2, dw0)


# --------------------------------------------------------------------------------- ln_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LN_LINEAR_CASES)
def test_ln_linear(backend, case, dtype):
    check_ln_linear_case(backend, case, dtype)


@pytest.mark.parametrize("case", ["mean-1000-batch", "mean-4-batch-no-bias"])
def test_ln_linear_batch_dims(backend, case):
    """Leading dimensions; normalise-on-load keeps the unfused numerics at |mean|/std = 1e3.

    (There both lose digits to the fp32 rounding of each row's mean, a per-row error: 64 rows
    make the comparison of error norms stable.)"""
    dev = backend.device
    if case == "mean-1000-batch":
        inputs = dict(
            x=randn(2, 32, 96, mean=1000.0, device=dev),
            ln_weight=randn(96, mean=1.0, std=0.2, device=dev),
            ln_bias=randn(96, std=0.2, device=dev),
            weight=randn(40, 96, std=0.1, device=dev),
            bias=randn(40, device=dev),
            residual=None,
        )
        fn = ln_linear_fn("layer", "none", "gelu", None, 0.0)
    else:
        inputs = dict(
            x=randn(2, 3, 40, mean=4.0, device=dev),
            ln_weight=torch.ones(40, device=dev),
            ln_bias=None,
            weight=randn(24, 40, std=0.2, device=dev),
            bias=None,
            residual=None,
        )
        fn = ln_linear_fn("layer", "none", "none", None, 0.0)
    compare_to_reference(backend, fn, inputs)


def test_ln_linear_partial_gradients(backend):
    """Only some inputs need gradients: the others come back as None, the rest are right."""
    inputs = ln_linear_inputs(
        19, 33, 21, "layer", False, True, "fp32", torch.float32, backend.device
    )
    x, ln_w, ln_b, w, b = (inputs[k] for k in ("x", "ln_weight", "ln_bias", "weight", "bias"))
    ln_w.requires_grad_()
    w.requires_grad_()
    y = mk.ln_linear(x, ln_w, ln_b, w, b, activation="gelu", backend=backend.name)
    dy = randn(19, 21, device=backend.device)
    g_lnw, g_w = torch.autograd.grad(y, [ln_w, w], dy)
    ln_w64, w64 = (t.detach().double().requires_grad_() for t in (ln_w, w))
    y64 = reference.ln_linear(x.double(), ln_w64, ln_b.double(), w64, b.double(), activation="gelu")
    r_lnw, r_w = torch.autograd.grad(y64, [ln_w64, w64], dy.double())
    torch.testing.assert_close(g_lnw.double(), r_lnw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_w.double(), r_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mask",
    [
        [True, False, False, False, False],
        [False, True, True, False, False],
        [False, False, False, True, False],
        [False, False, False, False, True],
        [True, False, True, True, False],
    ],
)
def test_ln_linear_backward_output_mask(kernels, mask):
    """Only the requested gradients come back, bit for bit the full call's; the rest are
    empty (library.py contract)."""
    dev = kernels.device
    x, lw, lb = (
        randn(21, 50, mean=1.0, device=dev),
        randn(50, mean=1.0, device=dev),
        randn(50, device=dev),
    )
    w = randn(30, 50, std=0.15, device=dev)
    fwd = get_op("ln_linear", kernels.family)
    bwd = get_op("ln_linear_backward", kernels.family)
    seed = torch.tensor(99, dtype=torch.int64, device=dev)
    out, mean, rstd, preact = fwd(
        x, lw, lb, w, None, None, seed, 1e-5, "layer", "gelu", "gelu", 1.0, 0.2
    )
    assert preact.shape == out.shape and mean.shape == (21,) and rstd.shape == (21,)
    dy = randn(21, 30, mean=0.1, device=dev)
    args = (dy, x, lw, lb, w, mean, rstd, preact, seed, "layer", "gelu", "gelu", 0.2)
    full, part = bwd(*args, [True] * 5), bwd(*args, mask)
    for wanted, f, g in zip(mask, full, part):
        if wanted:
            assert torch.equal(f, g)
        else:
            assert g.numel() == 0
    assert full[4].dtype == w.dtype and full[4].shape == (30,)


def test_ln_linear_op_contract(kernels):
    """Statistics, preact and absent gradients come back empty where the contract says, with
    the contract's dtypes (library.py)."""
    dev = kernels.device
    inputs = ln_linear_inputs(7, 9, 5, "layer", False, False, "fp32", torch.bfloat16, dev)
    x, ln_w, ln_b, w = (inputs[k] for k in ("x", "ln_weight", "ln_bias", "weight"))
    fwd = get_op("ln_linear", kernels.family)
    out, mean, rstd, preact = fwd(
        x, ln_w, ln_b, w, None, None, None, 1e-5, "layer", "none", "none", 1.0, 0.0
    )
    assert preact.shape == (0,) and mean.shape == (7,) and rstd.dtype == torch.float32
    dy = randn(7, 5, dtype=torch.bfloat16, device=dev)
    dx, dlnw, dlnb, dw, db = get_op("ln_linear_backward", kernels.family)(
        dy,
        x,
        ln_w,
        ln_b,
        w,
        mean,
        rstd,
        preact,
        None,
        "layer",
        "none",
        "none",
        0.0,
        [False, True, False, False, True],
    )
    assert dx.shape == dlnb.shape == dw.shape == (0,)
    assert dlnw.shape == (9,) and dlnw.dtype == torch.float32
    assert db.dtype == torch.bfloat16
    torch.testing.assert_close(db.float(), dy.float().sum(0), rtol=1e-2, atol=1e-2)
    _, mean_r, rstd_r, _ = fwd(
        x, ln_w, None, w, None, None, None, 1e-5, "rms", "none", "relu", 1.0, 0.0
    )
    assert mean_r.shape == (0,) and rstd_r.shape == (7,)
    x, w = randn(5, 16, mean=1.0, device=dev), randn(8, 16, device=dev)
    _, mean, rstd, preact = fwd(
        x,
        torch.ones(16, device=dev),
        None,
        w,
        None,
        None,
        None,
        1e-5,
        "rms",
        "none",
        "none",
        1.0,
        0.0,
    )
    assert mean.numel() == 0 and rstd.shape == (5,) and preact.numel() == 0
    _, mean, rstd, preact = fwd(
        x, None, None, w, None, None, None, 1e-5, "none", "none", "relu", 1.0, 0.0
    )
    assert mean.numel() == 0 and rstd.numel() == 0 and preact.shape == (5, 8)


# ----------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize(
    "rows,k,n,p",
    [
        (23, 17, 45, 0.1),
        (23, 17, 45, 0.5),
        (23, 17, 45, 0.9),
        (300, 64, 67, 0.1),
        (300, 64, 67, 0.5),
    ],
)
def test_dropout_mask_matches_reference(backend, rows, k, n, p):
    """The seed drawn from torch's generator (as the public ops draw it) gives
    reference.dropout_mask's mask, bit for bit; kept values are scaled by 1/(1-p)."""
    dev = backend.device
    x, w = randn(rows, k, mean=1.0, device=dev), randn(n, k, device=dev)
    torch.manual_seed(7)
    y = mk.ln_linear(x, None, None, w, dropout_p=p, backend=backend.name)
    torch.manual_seed(7)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=dev)
    keep = reference.dropout_mask(seed, (rows, n), p)
    assert torch.equal(y != 0, keep)
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(y, (x @ w.T) * keep / (1 - p), rtol=1e-5, atol=1e-5)
    torch.manual_seed(7)
    y_ref = mk.ln_linear(x, None, None, w, dropout_p=p, backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_of_the_ops_is_bit_identical(kernels, p):
    """x @ I with dropout: the zero pattern of the output (and of dx) is exactly the reference
    Philox mask, and kept values are scaled by 1/(1-p)."""
    rows, n, dev = 33, 70, kernels.device
    x = randn(rows, n, mean=3.0, std=0.5, device=dev).abs() + 0.5  # no zeros of its own
    eye = torch.eye(n, device=dev)
    seed = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64, device=dev)
    fwd = get_op("ln_linear", kernels.family)
    bwd = get_op("ln_linear_backward", kernels.family)
    out, mean, rstd, preact = fwd(
        x, None, None, eye, None, None, seed, 1e-5, "none", "none", "none", 1.0, p
    )
    keep = reference.dropout_mask(seed, (rows, n), p)
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)
    dy = randn(rows, n, mean=2.0, device=dev).abs() + 0.5
    dx = bwd(
        dy,
        x,
        None,
        None,
        eye,
        mean,
        rstd,
        preact,
        seed,
        "none",
        "none",
        "none",
        p,
        [True, False, False, False, False],
    )[0]
    assert torch.equal(dx != 0, keep)


def test_dropout_is_reproducible_through_manual_seed(backend):
    dev = backend.device
    x, w, ones = (
        randn(12, 20, mean=1.0, device=dev),
        randn(16, 20, device=dev),
        torch.ones(20, device=dev),
    )
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(mk.ln_linear(x, ones, None, w, dropout_p=0.5, backend=backend.name))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(6)
    assert not torch.equal(
        runs[0], mk.ln_linear(x, ones, None, w, dropout_p=0.5, backend=backend.name)
    )


def test_dh_is_rounded_to_x_dtype_on_every_backend(kernels):
    """One rule for dh = dz @ weight in ln_linear's backward on every backend: accumulated in
    float32 and rounded to x's dtype, as PyTorch's own bf16 linear backward rounds it
    (docs/design.md, Numerics). With float32 norm parameters, dgamma = Σ_rows dh ⊙ xhat is float32
    and shows the rounding: it is the float64 sum over the rounded dh, not over the exact one."""
    dev, bf16 = kernels.device, torch.bfloat16
    rows, k, n = 64, 48, 40
    x = randn(rows, k, dtype=bf16, mean=1.0, std=2.0, device=dev)
    ln_weight = randn(k, mean=1.0, std=0.3, device=dev)  # float32
    w = randn(n, k, dtype=bf16, std=k**-0.5, device=dev)
    dy = randn(rows, n, dtype=bf16, mean=0.3, device=dev)
    fwd, bwd = (get_op(op, kernels.family) for op in ("ln_linear", "ln_linear_backward"))
    _, mean, rstd, preact = fwd(
        x, ln_weight, None, w, None, None, None, 1e-5, "layer", "none", "none", 1.0, 0.0
    )
    mask = [False, True, False, False, False]
    dgamma = bwd(
        dy, x, ln_weight, None, w, mean, rstd, preact, None, "layer", "none", "none", 0.0, mask
    )[1].double()
    xhat = (x.double() - mean.double()[:, None]) * rstd.double()[:, None]
    dh_exact = dy.double() @ w.double()
    dh_rounded = (dy.float() @ w.float()).to(bf16).double()

    def error(dh):
        want = (dh * xhat).sum(0)
        return ((dgamma - want).norm() / want.norm()).item()

    assert error(dh_rounded) < 2e-4 and 5 * error(dh_rounded) < error(dh_exact)


# ------------------------------------------------------------------------------- dropout op

# (300, 67): many rows (split across threads) and 20 of the Triton kernel's 1024-element blocks.
_DROPOUT_SHAPES = [(23, 45), (2, 3, 37), (300, 67)]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_dropout_op_mask_is_the_reference_mask(backend, layout, dtype, p):
    """mk.dropout (the activation dropout outside the fused ops): element i of x (row-major over
    x's shape, whatever its strides) is kept iff reference.dropout_mask keeps it, bit for bit on
    every backend, kept values are x/(1-p) as the reference rounds them, and the gradient is the
    same mask on dy."""
    dev = backend.device
    base = randn(40, 64, mean=2.0, std=0.5, dtype=dtype, device=dev).abs() + 0.5  # no zeros
    x = {"contiguous": base, "transposed": base.t(), "sliced": base[3:31:2, 5:50]}[layout]
    x = x.detach().requires_grad_()
    torch.manual_seed(11)
    y = mk.dropout(x, p, backend=backend.name)
    torch.manual_seed(11)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=dev)
    keep = reference.dropout_mask(seed, tuple(x.shape), p)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y != 0, keep)
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(y, reference.dropout(x.detach(), p, seed))
    dy = randn(*x.shape, mean=1.0, std=0.5, dtype=dtype, device=dev).abs() + 0.5
    (dx,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(dx, reference.dropout(dy, p, seed))


@pytest.mark.parametrize("p", [0.25, 0.6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", _DROPOUT_SHAPES, ids=str)
def test_dropout_op(backend, shape, dtype, p):
    """Forward and gradient against the float64 reference (the same seed on every run)."""
    compare_to_reference(
        backend,
        lambda x, backend: mk.dropout(x, p, backend=backend),
        {"x": randn(*shape, dtype=dtype, mean=0.5, device=backend.device)},
        seed=len(shape),
    )


def test_dropout_op_contract(kernels):
    """The family's op: p = 0 copies x, an empty x gives an empty y, the seed's checks."""
    dev, op = kernels.device, get_op("dropout", kernels.family)
    x = randn(5, 7, mean=1.0, device=dev)
    seed = torch.tensor(3, dtype=torch.int64, device=dev)
    y = op(x, seed, 0.0)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert op(x[:0], seed, 0.5).shape == (0, 7)
    with pytest.raises(ValueError, match=r"^seed must have dtype torch.int64, got torch.float32$"):
        op(x, seed.float(), 0.5)
    with pytest.raises(ValueError, match=r"^seed must have shape \(\), got \(1,\)$"):
        op(x, seed.view(1), 0.5)
    assert mk.dropout(x, 0.0, backend=kernels.name) is x


# ------------------------------------------------------------------------------ empty batch


def test_zero_rows(backend):
    """An empty batch (whose tensors have null data pointers) gives empty outputs and zero
    parameter gradients, forward and backward, for every op."""
    dev = backend.device
    x = randn(0, 16, device=dev).requires_grad_()
    lw, w, b = (
        t.requires_grad_()
        for t in (randn(16, mean=1.0, device=dev), randn(8, 16, device=dev), randn(8, device=dev))
    )
    out = mk.ln_linear(x, lw, None, w, b, activation="gelu", dropout_p=0.1, backend=backend.name)
    assert out.shape == (0, 8)
    (out * 2).sum().backward()
    for t in (lw, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t)), "a sum over no rows is zero"
    lb = randn(16, device=dev).requires_grad_()
    y, s = mk.add_layer_norm(x, torch.zeros_like(x), lw, lb, backend=backend.name)
    assert y.shape == s.shape == (0, 16)
    lw.grad = None
    mk.layer_norm(x, lw, lb, backend=backend.name).sum().backward()
    assert torch.equal(lw.grad, torch.zeros_like(lw)) and torch.equal(lb.grad, torch.zeros_like(lb))
    y = mk.layer_norm(
        randn(0, 5, device=dev), torch.ones(5, device=dev), None, backend=backend.name
    )
    assert y.shape == (0, 5)


# ------------------------------------------------------------------------ op registration


def _opcheck_args(dev):
    inputs = ln_linear_inputs(9, 24, 10, "layer", True, True, "fp32", torch.float32, dev, mean=1.0)
    x, lw, lb, w, b, r = inputs.values()
    seed = torch.tensor(42, dtype=torch.int64, device=dev)
    return x, lw, lb, w, b, r, seed


@pytest.mark.parametrize("rows_as", [(9,), (3, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize(
    "op",
    [
        "layer_norm",
        "layer_norm_backward",
        "add_layer_norm",
        "ln_linear",
        "ln_linear_backward",
        "dropout",
    ],
)
def test_opcheck(kernels, op, rows_as):
    """Each op as registered; with the 9 rows given as (3, 3) leading dimensions too (the ops
    take (*, features) and return outputs with x's leading dimensions)."""
    dev, family = kernels.device, kernels.family
    x, lw, lb, w, b, r, seed = _opcheck_args(dev)
    _, mean, rstd = get_op("layer_norm", family)(x, lw, lb, 1e-5, "layer")
    ln_linear_args = (x, lw, lb, w, b, r, seed, 1e-5, "layer", "gelu", "silu", 1.5, 0.1)
    _, mean_l, rstd_l, preact = get_op("ln_linear", family)(*ln_linear_args)
    args = {
        "layer_norm": (x, lw, lb, 1e-5, "layer"),
        "layer_norm_backward": (
            randn(9, 24, device=dev),
            x,
            lw,
            lb,
            mean,
            rstd,
            randn(9, 24, device=dev),
            "layer",
            [True, True, True],
        ),
        "add_layer_norm": (x, randn(9, 24, device=dev), lw, None, 1e-5, 2.0, "rms"),
        "ln_linear": ln_linear_args,
        "ln_linear_backward": (
            randn(9, 10, device=dev),
            x,
            lw,
            lb,
            w,
            mean_l,
            rstd_l,
            preact,
            seed,
            "layer",
            "gelu",
            "silu",
            0.1,
            [True] * 5,
        ),
        "dropout": (x, seed, 0.3),
    }[op]
    args = tuple(  # the row-shaped tensors (9, features) as (*rows_as, features)
        a.reshape(*rows_as, a.shape[-1])
        if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == 9
        else a
        for a in args
    )
    if not op.endswith("_backward"):  # backward ops are not themselves differentiable
        args = tuple(
            a.detach().clone().requires_grad_()
            if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a
            for a in args
        )
    torch.library.opcheck(get_op(op, family), args)


# --------------------------------------------------------------- op-level argument errors


def _on(args: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _good_ln_linear_args():
    x = randn(6, 8, mean=1.0)
    return dict(
        x=x,
        ln_weight=torch.ones(8),
        ln_bias=torch.zeros(8) + 0.1,
        weight=randn(4, 8),
        bias=randn(4),
        residual=randn(6, 4),
        seed=None,
        eps=1e-5,
        norm="layer",
        input_activation="none",
        activation="none",
        alpha=1.0,
        dropout_p=0.0,
    )


@pytest.mark.parametrize(
    "change,needle",
    [
        (
            dict(x=randn(6, 8, dtype=torch.float64)),
            "x must have dtype torch.float32, torch.bfloat16",
        ),
        (dict(x=torch.tensor(1.0)), r"x must have a non-empty last dimension, got shape \(\)"),
        (dict(x=randn(6, 0)), r"x must have a non-empty last dimension, got shape \(6, 0\)"),
        (dict(residual=randn(3, 2, 4)), "residual must have shape"),
        (dict(ln_weight=torch.ones(7)), "ln_weight must have shape"),
        (dict(ln_weight=torch.ones(8, dtype=torch.float64)), "ln_weight must have dtype torch"),
        (dict(weight=randn(4, 9)), "weight must have shape"),
        (dict(weight=randn(4, 8, dtype=torch.bfloat16)), "weight must have x's dtype"),
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
    ],
)
def test_ln_linear_bad_input(kernels, change, needle):
    """The op's own checks, with what the public functions never pass (no seed, norm="none"
    with a weight): every family's op words them the same."""
    args = _on(_good_ln_linear_args(), kernels.device)
    args.update(_on(change, kernels.device))
    with pytest.raises(ValueError, match=needle):
        get_op("ln_linear", kernels.family)(*args.values())


def test_strided_inputs_are_read_as_their_values(kernels):
    """The ops take tensors of any strides (a transposed x, a strided parameter, a sliced
    residual) and compute what they would on contiguous copies."""
    args = _on(_good_ln_linear_args(), kernels.device)
    strided = dict(
        args,
        x=args["x"].t().contiguous().t(),
        ln_bias=torch.stack([args["ln_bias"]] * 2, 1)[:, 0],
        weight=args["weight"].t().contiguous().t(),
        residual=torch.cat([args["residual"]] * 2, 1)[:, :4],
    )
    for name in ("x", "ln_bias", "weight", "residual"):
        assert not strided[name].is_contiguous()
    op = get_op("ln_linear", kernels.family)
    for a, b in zip(op(*strided.values()), op(*args.values())):
        assert torch.equal(a, b)


def test_norm_ops_bad_input(kernels):
    family, dev = kernels.family, kernels.device
    x, w = randn(4, 8, device=dev), torch.ones(8, device=dev)
    with pytest.raises(ValueError, match="norm must be 'layer' or 'rms'"):
        get_op("layer_norm", family)(x, w, None, 1e-5, "none")
    with pytest.raises(ValueError, match="residual must have shape"):
        get_op("add_layer_norm", family)(x, randn(4, 9, device=dev), w, None, 1e-5, 1.0, "layer")
    _, mean, rstd = get_op("layer_norm", family)(x, w, None, 1e-5, "layer")
    bwd = get_op("layer_norm_backward", family)
    with pytest.raises(ValueError, match="rstd must have dtype"):
        bwd(x, x, w, None, mean, rstd.double(), None, "layer", [True, True, False])
    with pytest.raises(ValueError, match="mean must have shape"):
        bwd(x, x, w, None, mean[:3], rstd, None, "layer", [True, True, False])
    with pytest.raises(ValueError, match="grad_y must have shape"):
        bwd(x[:3], x, w, None, mean, rstd, None, "layer", [True, True, False])
    with pytest.raises(ValueError, match="output_mask must have 3 entries"):
        bwd(x, x, w, None, mean, rstd, None, "layer", [True, True])
    with pytest.raises(ValueError, match="preact must have shape"):
        get_op("ln_linear_backward", family)(
            randn(4, 3, device=dev),
            x,
            w,
            None,
            randn(3, 8, device=dev),
            mean,
            rstd,
            randn(0, device=dev),
            None,
            "layer",
            "none",
            "gelu",
            0.0,
            [True] * 5,
        )


# ------------------------------------------------------------------------- argument errors


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=TEST_DEVICE)


# A bad value or type of each argument of each public op: (call, error, message). The message is
# the public API's, raised by the op of every backend (csrc/checks.cpp, csrc/module.cpp for the
# native family, checks.py for triton and the reference).
_BAD_CALLS = {
    "layer_norm x type": (
        lambda be: mk.layer_norm([1.0] * 8, None, None, backend=be),
        TypeError,
        "x must be a Tensor, got list",
    ),
    "layer_norm x shape": (
        lambda be: mk.layer_norm(_x(4, 0), None, None, backend=be),
        ValueError,
        r"x must have a non-empty last dimension, got shape \(4, 0\)",
    ),
    "layer_norm weight shape": (
        lambda be: mk.layer_norm(_x(4, 8), _x(7), None, backend=be),
        ValueError,
        r"weight must have shape \(8,\), got \(7,\)",
    ),
    "layer_norm weight type": (
        lambda be: mk.layer_norm(_x(4, 8), [1.0] * 8, None, backend=be),
        TypeError,
        "weight must be a Tensor or None, got list",
    ),
    "layer_norm weight dtype": (
        lambda be: mk.layer_norm(_x(4, 8), _x(8, dtype=torch.float64), None, backend=be),
        ValueError,
        "weight must have dtype torch.float32, got torch.float64",
    ),
    "layer_norm weight dtype, bf16 x": (
        lambda be: mk.layer_norm(
            _x(4, 8, dtype=torch.bfloat16), _x(8, dtype=torch.float16), None, backend=be
        ),
        ValueError,
        "weight must have x's dtype torch.bfloat16 or torch.float32, got torch.float16",
    ),
    "layer_norm rms bias": (
        lambda be: mk.layer_norm(_x(4, 8), _x(8), _x(8), norm="rms", backend=be),
        ValueError,
        r"bias must be None for norm='rms' \(RMSNorm has no bias\)",
    ),
    "layer_norm bias without weight": (
        lambda be: mk.layer_norm(_x(4, 8), None, _x(8), backend=be),
        ValueError,
        "bias given without weight",
    ),
    "layer_norm eps": (
        lambda be: mk.layer_norm(_x(4, 8), None, None, -1, backend=be),
        ValueError,
        r"eps must be >= 0, got -1.0",
    ),
    "layer_norm eps type": (
        lambda be: mk.layer_norm(_x(4, 8), None, None, "1e-5", backend=be),
        TypeError,
        "eps must be a float, got str",
    ),
    "layer_norm norm": (
        lambda be: mk.layer_norm(_x(4, 8), None, None, norm="batch", backend=be),
        ValueError,
        "norm must be 'layer' or 'rms', got 'batch'",
    ),
    "layer_norm norm type": (
        lambda be: mk.layer_norm(_x(4, 8), None, None, norm=None, backend=be),
        TypeError,
        "norm must be a str, got NoneType",
    ),
    "add_layer_norm residual": (
        lambda be: mk.add_layer_norm(_x(2, 4, 8), _x(4, 2, 8), None, None, backend=be),
        ValueError,
        r"residual must have shape \(2, 4, 8\), got \(4, 2, 8\)",
    ),
    "add_layer_norm residual dtype": (
        lambda be: mk.add_layer_norm(
            _x(4, 8), _x(4, 8, dtype=torch.float16), None, None, backend=be
        ),
        ValueError,
        "residual must have x's dtype torch.float32, got torch.float16",
    ),
    "add_layer_norm residual type": (
        lambda be: mk.add_layer_norm(_x(4, 8), None, None, None, backend=be),
        TypeError,
        "residual must be a Tensor, got NoneType",
    ),
    "add_layer_norm alpha type": (
        lambda be: mk.add_layer_norm(_x(4, 8), _x(4, 8), None, None, alpha="2", backend=be),
        TypeError,
        "alpha must be a float, got str",
    ),
    "ln_linear x shape": (
        lambda be: mk.ln_linear(_x(4, 0), None, None, _x(5, 0), backend=be),
        ValueError,
        r"x must have a non-empty last dimension, got shape \(4, 0\)",
    ),
    "ln_linear ln_weight shape": (
        lambda be: mk.ln_linear(_x(4, 8), _x(7), None, _x(5, 8), backend=be),
        ValueError,
        r"ln_weight must have shape \(8,\), got \(7,\)",
    ),
    "ln_linear ln_bias without ln_weight": (
        lambda be: mk.ln_linear(_x(4, 8), None, _x(8), _x(5, 8), backend=be),
        ValueError,
        "ln_bias given without ln_weight",
    ),
    "ln_linear rms ln_bias": (
        lambda be: mk.ln_linear(_x(4, 8), _x(8), _x(8), _x(5, 8), norm="rms", backend=be),
        ValueError,
        r"ln_bias must be None for norm='rms' \(RMSNorm has no bias\)",
    ),
    "ln_linear weight type": (
        lambda be: mk.ln_linear(_x(4, 8), None, None, None, backend=be),
        TypeError,
        "weight must be a Tensor, got NoneType",
    ),
    "ln_linear weight shape": (
        lambda be: mk.ln_linear(_x(4, 8), None, None, _x(5, 9), backend=be),
        ValueError,
        r"weight must have shape \(out_features, 8\), got \(5, 9\)",
    ),
    "ln_linear weight dtype": (
        lambda be: mk.ln_linear(_x(4, 8), None, None, _x(5, 8, dtype=torch.float64), backend=be),
        ValueError,
        "weight must have x's dtype torch.float32, got torch.float64",
    ),
    "ln_linear bias shape": (
        lambda be: mk.ln_linear(_x(4, 8), None, None, _x(5, 8), _x(4), backend=be),
        ValueError,
        r"bias must have shape \(5,\), got \(4,\)",
    ),
    "ln_linear residual": (
        lambda be: mk.ln_linear(
            _x(2, 3, 8), None, None, _x(5, 8), residual=_x(3, 2, 5), backend=be
        ),
        ValueError,
        r"residual must have shape \(2, 3, 5\), got \(3, 2, 5\)",
    ),
    "ln_linear norm": (
        lambda be: mk.ln_linear(_x(4, 8), _x(8), None, _x(5, 8), norm="none", backend=be),
        ValueError,
        "norm must be 'layer' or 'rms', got 'none'",
    ),
    "ln_linear activation": (
        lambda be: mk.ln_linear(_x(4, 8), None, None, _x(5, 8), activation="tanh", backend=be),
        ValueError,
        "activation must be one of 'none', 'gelu', 'gelu_tanh', 'relu', 'silu', 'relu2', "
        "got 'tanh'",
    ),
    "ln_linear input_activation": (
        lambda be: mk.ln_linear(_x(4, 8), None, None, _x(5, 8), input_activation="elu", backend=be),
        ValueError,
        "input_activation must be one of 'none', 'gelu', 'gelu_tanh', 'relu', 'silu', 'relu2', "
        "'geglu', 'swiglu', 'relu2_glu', got 'elu'",
    ),
    "ln_linear gated width": (
        lambda be: mk.ln_linear(
            _x(4, 7), None, None, _x(5, 3), input_activation="swiglu", backend=be
        ),
        ValueError,
        r"input_activation='swiglu' needs x = \[gate \| up\] with an even last dimension, got "
        r"shape \(4, 7\)",
    ),
    "ln_linear dropout_p": (
        lambda be: mk.ln_linear(_x(4, 8), None, None, _x(5, 8), dropout_p=1.0, backend=be),
        ValueError,
        r"dropout_p must be in \[0, 1\), got 1.0",
    ),
    "dropout p": (
        lambda be: mk.dropout(_x(4, 8), 1.0, backend=be),
        ValueError,
        r"p must be in \[0, 1\), got 1.0",
    ),
    "dropout x": (
        lambda be: mk.dropout(_x(4, 0), 0.5, backend=be),
        ValueError,
        r"x must have a non-empty last dimension, got shape \(4, 0\)",
    ),
    "ln_linear eps": (
        lambda be: mk.ln_linear(_x(4, 8), _x(8), None, _x(5, 8), eps=-0.5, backend=be),
        ValueError,
        "eps must be >= 0, got -0.5",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_bad_arguments_get_the_public_message_on_every_backend(backend, case):
    """Every backend's op checks its arguments (the native family's in C++, the others in
    checks.py) and words its errors as the public API does, nothing being checked twice."""
    call, error, message = _BAD_CALLS[case]
    with pytest.raises(error, match=f"^{message}$"):
        call(backend.name)
