"""Edge inputs on every backend (harness.BACKENDS), forward and every gradient, against the
float64 reference: strided x, weights, biases and residuals (views whose gradients flow back to
their bases), leading batch dimensions, zero rows, wide rows, rows with NaN/inf, and magnitudes
up to |x| = 1e4 in fp16 and 1e15 in fp32.

What holds for a non-finite row (a NaN or ±inf anywhere in row r of x): every other row's
output and its input gradient are bit for bit those of the same call with row r replaced by
finite values; the parameter gradients (sums over rows) are non-finite exactly where the
float64 reference's are, and finite elsewhere.
"""

import pytest
import torch
from harness import (
    GPU,
    backend_params,
    compare_to_reference,
    randn,
)

import magneto_kernels as mk


@pytest.fixture(params=backend_params())
def backend(request):
    with request.param.running() as b:
        yield b


def _strided(t):
    """A view of t with other strides (every dimension): the last dimension with stride 2 and
    a 2-D t transposed in memory; differentiable, so gradients reach t."""
    if t is None:
        return None
    doubled = torch.stack([t, t], -1)[..., 0]
    if t.dim() == 2:
        return doubled.t().contiguous().t()
    return doubled


def _layer_norm(x, weight, bias, backend, norm="layer", view=lambda t: t):
    return mk.layer_norm(view(x), view(weight), view(bias), norm=norm, backend=backend)


def _add_layer_norm(x, residual, weight, bias, backend, norm="layer", view=lambda t: t):
    return mk.add_layer_norm(
        view(x), view(residual), view(weight), view(bias), alpha=0.9, norm=norm, backend=backend
    )


def _ln_linear(x, ln_weight, ln_bias, weight, bias, residual, backend, view=lambda t: t, **opts):
    return mk.ln_linear(
        view(x), view(ln_weight), view(ln_bias), view(weight), view(bias),
        residual=view(residual), backend=backend, **opts,
    )  # fmt: skip


def _norm_inputs(shape, dtype, device, mean=2.0, std=1.0, param_dtype=None):
    cols = shape[-1]
    p = param_dtype or dtype
    return {
        "x": randn(*shape, dtype=dtype, mean=mean, std=std, device=device),
        "weight": randn(cols, dtype=p, mean=1.0, std=0.3, device=device),
        "bias": randn(cols, dtype=p, mean=0.2, std=0.5, device=device),
    }


def _linear_inputs(shape, out, dtype, device, mean=1.5, std=2.0):
    k = shape[-1]
    return {
        "x": randn(*shape, dtype=dtype, mean=mean, std=std, device=device),
        "ln_weight": randn(k, dtype=dtype, mean=1.0, std=0.3, device=device),
        "ln_bias": randn(k, dtype=dtype, mean=0.1, std=0.3, device=device),
        "weight": randn(out, k, dtype=dtype, std=k**-0.5, device=device),
        "bias": randn(out, dtype=dtype, mean=0.1, std=0.2, device=device),
        "residual": randn(*shape[:-1], out, dtype=dtype, mean=-0.5, device=device),
    }


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------ strides


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_everything(backend, dtype):
    """Every tensor argument a strided view (x transposed in memory, parameters with stride 2)."""
    torch.manual_seed(0)
    dev = backend.device
    compare_to_reference(
        backend, lambda **a: _layer_norm(**a, view=_strided), _norm_inputs((9, 40), dtype, dev)
    )
    inputs = _norm_inputs((9, 40), dtype, dev)
    inputs = {"x": inputs["x"], "residual": randn(9, 40, dtype=dtype, device=dev), **inputs}
    compare_to_reference(backend, lambda **a: _add_layer_norm(**a, view=_strided), inputs)
    compare_to_reference(
        backend,
        lambda **a: _ln_linear(**a, view=_strided, activation="gelu", alpha=0.7),
        _linear_inputs((9, 24), 16, dtype, dev),
    )


def test_strided_batched_x(backend):
    """A (batch, length, features) x whose leading dimensions are transposed in memory."""
    torch.manual_seed(1)

    def swap(t):
        return t if t is None or t.dim() < 3 else t.transpose(0, 1).contiguous().transpose(0, 1)

    compare_to_reference(
        backend,
        lambda **a: _ln_linear(**a, view=swap, input_activation="silu"),
        _linear_inputs((3, 5, 24), 16, torch.float32, backend.device),
    )


# ------------------------------------------------------------------------ shapes and zero rows


@pytest.mark.parametrize("shape", [(2, 3, 4, 40), (1, 1, 40)], ids=str)
def test_leading_dims(backend, shape):
    torch.manual_seed(2)
    dev = backend.device
    compare_to_reference(backend, _layer_norm, _norm_inputs(shape, torch.float32, dev))
    compare_to_reference(backend, _ln_linear, _linear_inputs(shape, 7, torch.float32, dev))


@pytest.mark.parametrize("shape", [(0, 40), (2, 0, 40), (0, 3, 40)], ids=str)
def test_zero_rows(backend, shape):
    """No rows: outputs of shape (*, out), x's gradient empty, parameter gradients zero."""
    dev = backend.device
    for fn, inputs, out_cols in (
        (_layer_norm, _norm_inputs(shape, torch.float32, dev), 40),
        (_ln_linear, _linear_inputs(shape, 7, torch.float32, dev), 7),
    ):
        leaves = {k: v.requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves, backend=backend.name)
        assert out.shape == (*shape[:-1], out_cols)
        out.sum().backward()
        for name, leaf in leaves.items():
            assert leaf.grad is not None and leaf.grad.shape == leaf.shape, name
            assert not leaf.grad.any(), name


# ---------------------------------------------------------------------------------- wide rows


@pytest.mark.parametrize(
    "cols", [8192, 65536, pytest.param(65537, marks=GPU)], ids=lambda c: f"cols{c}"
)
def test_wide_ln_linear(backend, cols):
    """ln_linear with in_features up to 65536 (the norm ops' 65536 is in test_ops.py)."""
    if backend.name == "triton" and backend.device == "cpu" and cols > 8192:
        pytest.skip("a minute in Triton's interpreter; on a GPU in bench/gpu_check.sh")
    torch.manual_seed(3)
    compare_to_reference(
        backend, _ln_linear, _linear_inputs((2, cols), 3, torch.float32, backend.device)
    )


# ------------------------------------------------------------------------------- large values


@pytest.mark.parametrize(
    "dtype, std", [(torch.float16, 1e4), (torch.float32, 1e15)], ids=["fp16-1e4", "fp32-1e15"]
)
def test_large_magnitudes(backend, dtype, std):
    """|x| up to 1e4 in fp16 (close to its 65504 limit: squares overflow fp16) and 1e15 in fp32
    (squares near 1e30): the statistics are float32 and scaled right on every backend."""
    torch.manual_seed(4)
    dev = backend.device
    big = _norm_inputs((7, 100), dtype, dev, mean=0.5 * std, std=0.3 * std)
    compare_to_reference(backend, _layer_norm, big)
    rms = dict(big, bias=None)
    compare_to_reference(backend, lambda **a: _layer_norm(**a, norm="rms"), rms)
    residual = randn(7, 100, dtype=dtype, std=0.2 * std, device=dev)
    compare_to_reference(backend, _add_layer_norm, {"x": big["x"], "residual": residual, **big})
    lin = _linear_inputs((7, 48), 8, dtype, dev, mean=0.5 * std, std=0.3 * std)
    lin["residual"] = None
    compare_to_reference(backend, _ln_linear, lin)


# ---------------------------------------------------------------------------- non-finite rows


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "ln_linear"])
def test_non_finite_row_stays_in_its_row(backend, op, bad):
    torch.manual_seed(5)
    dev = backend.device
    rows, cols, row = 6, 40, 2
    if op == "ln_linear":
        inputs = _linear_inputs((rows, cols), 9, torch.float32, dev)
        fn = _ln_linear
    else:
        inputs = _norm_inputs((rows, cols), torch.float32, dev)
        if op == "add_layer_norm":
            inputs = {"x": inputs["x"], "residual": randn(rows, cols, device=dev), **inputs}
        fn = _layer_norm if op == "layer_norm" else _add_layer_norm
    poisoned = dict(inputs, x=inputs["x"].clone())
    poisoned["x"][row, 7] = bad

    def run(args, backend_name, dtype=None):
        leaves = {
            k: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
            for k, t in args.items()
        }
        outs = fn(**leaves, backend=backend_name)
        outs = outs if isinstance(outs, tuple) else (outs,)
        dys = [torch.ones_like(o) + 0.1 for o in outs]
        present = [k for k, t in leaves.items() if t is not None]
        grads = torch.autograd.grad(outs, [leaves[k] for k in present], dys)
        return outs, dict(zip(present, grads))

    outs, grads = run(poisoned, backend.name)
    clean_outs, clean_grads = run(inputs, backend.name)
    _, ref_grads = run(poisoned, "reference", torch.float64)
    others = [r for r in range(rows) if r != row]
    for o, c in zip(outs, clean_outs):
        assert torch.equal(o[others], c[others]), "another row's output changed"
    for name in ("x", "residual"):
        if name in grads:
            assert torch.equal(grads[name][others], clean_grads[name][others]), name
    for name, g in grads.items():
        if name in ("x", "residual"):
            continue
        bad_ref = ~torch.isfinite(ref_grads[name].to(dev))
        assert torch.equal(~torch.isfinite(g), bad_ref), f"grad of {name}: non-finite pattern"
