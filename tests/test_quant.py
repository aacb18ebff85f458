"""BitNet b1.58's quantised projection, reference formula (magneto_kernels/quant.py): transformers'
AutoBitLinear (online and offline) and BitLinear after BitNetRMSNorm, forward and (online) every
gradient, in fp32 and bf16 (bit for bit where transformers runs eagerly; online within torch's
default tolerance of the dtype: transformers' WeightQuant is torch.compile'd, and its absmean
sums in inductor's order, an ulp off the eager mean); its activation codes against a float64
evaluation, one code of difference allowed only at detected rounding ties; bad arguments refused."""

from __future__ import annotations

import pytest
import torch

from magneto_kernels import quant
from tests.harness import randn

transformers = pytest.importorskip("transformers")
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights  # noqa: E402
from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm  # noqa: E402

K, N, EPS = 64, 32, 1e-6
DTYPES = (torch.float32, torch.bfloat16)


def _inputs(dtype, gated=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = 2 * K if gated else K
    x = randn(3, 5, width, dtype=dtype, mean=0.4, std=1.3, generator=gen)
    ln_weight = randn(K, dtype=dtype, mean=1.0, std=0.2, generator=gen)
    weight = randn(N, K, dtype=dtype, std=0.05, generator=gen)
    return x, ln_weight, weight


def _hf_norm(ln_weight, dtype):
    norm = BitNetRMSNorm(K, eps=EPS).to(dtype)
    norm.weight.data.copy_(ln_weight)
    return norm


@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_online_matches_autobitlinear_with_every_gradient(dtype, gated):
    x, ln_weight, weight = _inputs(dtype, gated)
    bias = randn(N, dtype=dtype, mean=0.1)
    residual = randn(3, 5, N, dtype=dtype)
    linear = AutoBitLinear(K, N, bias=True, online_quant=True, dtype=dtype)
    linear.weight.data.copy_(weight)
    linear.bias.data.copy_(bias)
    norm = _hf_norm(ln_weight, dtype)
    xa = x.clone().requires_grad_()
    a = xa
    if gated:
        gate, up = xa.chunk(2, dim=-1)
        a = torch.square(torch.relu(gate)) * up
    expected = residual + linear(norm(a))
    xb, lw, w, b = (t.clone().requires_grad_() for t in (x, ln_weight, weight, bias))
    out = quant.ln_linear_bitnet(
        xb, lw, w, b, eps=EPS, residual=residual,
        input_activation="relu2_glu" if gated else None,
    )  # fmt: skip
    torch.testing.assert_close(out, expected)
    dy = randn(*out.shape, dtype=dtype, mean=0.3)
    expected.backward(dy)
    out.backward(dy)
    for mine, theirs, name in (
        (xb.grad, xa.grad, "x"),
        (lw.grad, norm.weight.grad, "ln_weight"),
        (w.grad, linear.weight.grad, "weight"),
        (b.grad, linear.bias.grad, "bias"),
    ):
        torch.testing.assert_close(mine, theirs, msg=name)


def _ternary(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (N, K), generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offline_matches_autobitlinear(dtype):
    x, ln_weight, _ = _inputs(dtype)
    linear = AutoBitLinear(K, N, bias=False, online_quant=False, dtype=dtype)
    linear.weight.data.copy_(_ternary(dtype))
    linear.weight_scale.fill_(0.037)
    expected = linear(_hf_norm(ln_weight, dtype)(x))
    out = quant.ln_linear_bitnet(
        x, ln_weight, linear.weight, quant="bitnet_offline", weight_scale=linear.weight_scale,
        eps=EPS,
    )  # fmt: skip
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitlinear_matches_transformers(dtype):
    """BitLinear divides by weight_scale (AutoBitLinear multiplies) and quantises in x's dtype."""
    x, ln_weight, _ = _inputs(dtype)
    ternary = _ternary(dtype)
    linear = BitLinear(K, N, bias=True, dtype=dtype)
    linear.weight.copy_(pack_weights(ternary.to(torch.int8)))
    linear.weight_scale.fill_(3.5)
    linear.bias.copy_(randn(N, dtype=dtype, generator=torch.Generator().manual_seed(2)))
    h = _hf_norm(ln_weight, dtype)(x)
    expected = linear(h)
    out = quant.ln_linear_bitnet(
        x, ln_weight, ternary, linear.bias, quant="bitlinear", weight_scale=linear.weight_scale,
        eps=EPS,
    )  # fmt: skip
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:  # one bf16 rounding apart before the bias add (the order of inductor's float32 steps)
        atol = 2.0**-8 * (expected.abs().max() + linear.bias.abs().max()).item()
        torch.testing.assert_close(out, expected, rtol=2.0**-7, atol=atol)


def test_activation_codes_match_float64_up_to_ties():
    """fp32 codes against the float64 evaluation: equal except where float64_codes sees a tie."""
    for seed in range(20):
        x, ln_weight, _ = _inputs(torch.float32, seed=seed)
        h = quant.bitnet_norm(x, ln_weight, EPS)
        q, _ = quant.act_codes(h)
        h64 = quant.bitnet_norm(x.double(), ln_weight.double(), EPS)
        s64 = quant.QMAX / h64.abs().amax(-1, keepdim=True).clamp(min=quant.ACT_EPS)
        q64, tie = quant.float64_codes(h64, s64)
        diff = (q.double() - q64).abs()
        assert diff.max() <= 1
        assert bool((diff == 0)[~tie].all()), f"seed {seed}: a code differs away from a tie"


def test_tie_detector_sees_exact_ties():
    h = torch.tensor([[127.0, 0.5, 2.5, -1.5, 0.3]], dtype=torch.float64)
    q, tie = quant.float64_codes(h, torch.ones(1, 1, dtype=torch.float64))
    assert tie.tolist() == [[False, True, True, True, False]]
    assert q.tolist() == [[127.0, 0.0, 2.0, -2.0, 0.0]]  # half to even, as torch rounds


def test_bad_arguments_are_refused():
    x, ln_weight, weight = _inputs(torch.float32)
    with pytest.raises(ValueError, match="quant must be"):
        quant.ln_linear_bitnet(x, ln_weight, weight, quant="int4")
    with pytest.raises(ValueError, match=r"weight_scale of shape \(1,\), got \(2,\)"):
        quant.ln_linear_bitnet(
            x, ln_weight, weight, quant="bitnet_offline", weight_scale=torch.ones(2)
        )
    with pytest.raises(ValueError, match="weight_scale"):
        quant.ln_linear_bitnet(x, ln_weight, weight, quant="bitlinear")
    with pytest.raises(ValueError, match="input_activation"):
        quant.ln_linear_bitnet(x, ln_weight, weight, input_activation="swiglu")
