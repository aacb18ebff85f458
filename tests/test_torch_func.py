"""torch.func transforms on the ops and the modules.

Every kernel family's autograd is a C++ function, which functorch's differentiating transforms
(grad, vjp, jacrev, jacfwd) refuse. The ops then: with no backend asked for (``backend=None``
and MAGNETO_BACKEND unset) run on the reference backend, which works through plain autograd;
with a kernel backend asked for, raise an error that names ``backend='reference'``. vmap alone
runs the kernels (torch's per-sample fallback)."""

import pytest
import torch
from harness import BY_NAME, assert_close, randn, require_backend
from torch.func import functional_call, grad, jacrev, vmap

import magneto_kernels as mk
from magneto.nn import TransformerEncoderLayer

W, B = randn(8, mean=1.0, std=0.3), randn(8, std=0.3)
WEIGHT = randn(5, 8, std=0.4)
X = randn(4, 8, mean=0.5)


def _ln_linear_sum(x, backend=None):
    return mk.ln_linear(x, W, B, WEIGHT, activation="gelu", backend=backend).sum()


def test_transforms_with_the_default_backend_match_autograd(monkeypatch):
    monkeypatch.delenv(mk.ENV_VAR, raising=False)
    x = X.clone().requires_grad_()
    (want,) = torch.autograd.grad(_ln_linear_sum(x, "reference"), x)
    assert_close(grad(_ln_linear_sum)(X), want, rtol=1e-6)
    per_sample = vmap(grad(lambda xi: _ln_linear_sum(xi[None])))(X)
    assert_close(per_sample, want, rtol=1e-6)  # rows are independent: the same gradients
    jac = jacrev(lambda x: mk.layer_norm(x, W, B))(X)
    want_jac = torch.autograd.functional.jacobian(
        lambda x: mk.layer_norm(x, W, B, backend="reference"), X
    )
    assert_close(jac, want_jac, rtol=1e-6)


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_a_kernel_backend_asked_for_names_the_reference(name, monkeypatch):
    backend = BY_NAME[name]
    if backend.gpu:
        pytest.skip("the CUDA backend runs on CPU tensors only when emulated")
    require_backend(name, "cpu")
    with pytest.raises(RuntimeError, match=f"backend '{name}'.*backend='reference'"):
        grad(lambda x: _ln_linear_sum(x, name))(X)
    monkeypatch.setenv(mk.ENV_VAR, name)
    with pytest.raises(RuntimeError, match=f"MAGNETO_BACKEND='{name}'.*backend='reference'"):
        jacrev(lambda x: mk.layer_norm(x, W, B))(X)
    # vmap alone runs the kernels
    out = vmap(lambda xi: mk.layer_norm(xi, W, B))(X)
    assert_close(out, mk.layer_norm(X, W, B, backend="reference"), rtol=1e-6)


def test_per_sample_gradients_of_a_layer(monkeypatch):
    """vmap(grad) over a magneto.nn layer's parameters (functional_call): each sample's gradient
    equals autograd's on that sample alone."""
    monkeypatch.delenv(mk.ENV_VAR, raising=False)
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, batch_first=True)
    layer.eval()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = randn(3, 5, 16, mean=0.2)

    def loss(p, x):
        return functional_call(layer, p, (x[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(3):
        layer.zero_grad()
        layer(xs[i : i + 1]).square().sum().backward()
        for name, p in layer.named_parameters():
            assert_close(per_sample[name][i], p.grad, rtol=1e-5, name=name)
