"""``residual_in_fp32``: add_layer_norm's sum kept in float32 for bf16/fp16 rows, on every
backend, and the Post-LN / DeepNorm blocks that use it (``MagnetoConfig.residual_in_fp32``)."""

import pytest
import torch
from harness import assert_close_to_reference, backend_params, randn

import magneto
import magneto_kernels as mk
from magneto_kernels import reference


@pytest.fixture(params=backend_params())
def backend(request):
    with request.param.running() as b:
        yield b


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_add_layer_norm_residual_in_fp32(backend, low, norm):
    """s comes back in float32 and as close to the float64 sum as a float32 op's; N(s) in x's
    dtype, within the tolerance of x's dtype; the gradients reach x, the residual and the
    parameters in their own dtypes, within the float32 op's error (the only rounding is x's)."""
    torch.manual_seed(0)
    x = randn(33, 200, dtype=low, mean=1.0, device=backend.device)
    residual = randn(33, 200, mean=-2.0, std=3.0, device=backend.device)
    weight = randn(200, dtype=low, mean=1.0, std=0.3, device=backend.device)
    bias = randn(200, dtype=low, std=0.3, device=backend.device) if norm == "layer" else None
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, residual)]
    params = [t if t is None else t.detach().clone().requires_grad_() for t in (weight, bias)]
    y, s = mk.add_layer_norm(
        *leaves, *params, alpha=0.8, norm=norm, residual_in_fp32=True, backend=backend.name
    )
    assert y.dtype == low and s.dtype == torch.float32

    def ref(dtype):
        args = [t if t is None else t.detach().to(dtype).requires_grad_() for t in (x, residual)]
        ps = [t if t is None else t.detach().to(dtype).requires_grad_() for t in (weight, bias)]
        outs = reference.add_layer_norm(*args, *ps, 1e-5, alpha=0.8, norm=norm)
        return args + ps, outs

    (args64, (y64, s64)), (args32, (y32, s32)) = ref(torch.float64), ref(torch.float32)
    assert_close_to_reference(s, s64, s32, "s")
    assert_close_to_reference(y, y64, y32.to(low), "y (float32 arithmetic, rounded once)")
    g = torch.Generator().manual_seed(3)
    dy = randn(*y.shape, dtype=torch.float64, mean=0.3, generator=g, device=backend.device)
    ds = randn(*s.shape, dtype=torch.float64, generator=g, device=backend.device)
    present = [t for t in (*leaves, *params) if t is not None]
    grads = torch.autograd.grad((y, s), present, (dy.to(low), ds.float()))
    wants64 = torch.autograd.grad((y64, s64), [t for t in args64 if t is not None], (dy, ds))
    wants32 = torch.autograd.grad(
        (y32, s32), [t for t in args32 if t is not None], (dy.to(low).float(), ds.float())
    )
    for i, (grad, leaf, g64, g32) in enumerate(zip(grads, present, wants64, wants32)):
        assert grad.dtype == leaf.dtype, i
        # float32 arithmetic, rounded once to the leaf's dtype
        assert_close_to_reference(grad, g64, g32.to(grad.dtype), f"grad {i}", atol=1e-5)


def test_without_the_flag_mixed_dtypes_are_refused():
    x, residual = randn(3, 8, dtype=torch.bfloat16), randn(3, 8)
    with pytest.raises(ValueError, match="residual"):
        mk.add_layer_norm(x, residual, None, None, backend="reference")


def test_config_flag_must_be_bool():
    with pytest.raises(ValueError, match="residual_in_fp32"):
        magneto.MagnetoConfig(residual_in_fp32="yes")


@pytest.mark.parametrize("scheme", ["post", "deepnorm"])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_post_ln_model_residual_in_fp32(scheme, backend_name, monkeypatch):
    """A bf16 Post-LN / DeepNorm encoder with the flag: every add_layer_norm is asked for a
    float32 sum, the output stays bf16, and the norms' weight gradients are no further from the
    float64 model's than without the flag (measured: closer on the cpu backend)."""
    monkeypatch.setenv(mk.ENV_VAR, backend_name)
    calls = []
    original = mk.add_layer_norm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("residual_in_fp32"))
        return original(*args, **kwargs)

    monkeypatch.setattr(magneto.fusion.magneto_kernels, "add_layer_norm", spy)

    def dgammas(dtype, fp32):
        torch.manual_seed(0)
        config = magneto.MagnetoConfig(
            embed_dim=64, num_heads=4, ffn_dim=96, encoder_layers=2, positions="none",
            norm_scheme=scheme, residual_in_fp32=fp32,
        )  # fmt: skip
        model = magneto.Encoder(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model = model.to(dtype)
        g = torch.Generator().manual_seed(1)
        x = randn(4, 16, 64, dtype=torch.float64, mean=0.5, generator=g).to(dtype)
        out = model(None, token_embeddings=x)["encoder_out"]
        assert out.dtype == dtype
        dy = randn(*out.shape, dtype=torch.float64, generator=g).to(dtype)
        (out * dy).sum().backward()
        return torch.cat(
            [p.grad.double() for n, p in model.named_parameters() if n.endswith("norm.weight")]
        )

    monkeypatch.setenv(mk.ENV_VAR, "reference")
    want = dgammas(torch.float64, False)
    monkeypatch.setenv(mk.ENV_VAR, backend_name)
    calls.clear()
    with_flag = dgammas(torch.bfloat16, True)
    assert calls and all(calls)
    without = dgammas(torch.bfloat16, False)
    err, err_before = ((g - want).norm() / want.norm() for g in (with_flag, without))
    assert err <= err_before * 1.05 and err <= 3e-2, (err, err_before)
