"""ln_linear's quantised projection (``quant=``, BitNet b1.58) through the op, on every backend
that has it (``quant.BACKENDS``): the offline modes (integer kernels on the cpu backend,
whichever ISA build runs: tools/with_cpu_isa.sh forces the others; the triton int8 GEMM, in the
interpreter here) against a float64 evaluation of transformers' formula,
one activation code of difference allowed only at detected rounding ties
(``quant.float64_codes``); the online mode forward and every gradient against the reference;
the packed layout; bad arguments refused with the same error on every backend; a backend
without the kernels (cuda) refusing the mode."""

from __future__ import annotations

import pytest
import torch

from magneto_kernels import ops, quant
from magneto_kernels.codes import QUANT_PACK_UNIT, RTOL
from tests.harness import (
    ATOL,
    ELEMENT_RTOL_FACTOR,
    assert_close,
    assert_elementwise,
    backend_params,
    compare_to_reference,
    randn,
)

K, N, EPS = 2 * QUANT_PACK_UNIT, 48, 1e-6
OFFLINE = quant.OFFLINE_MODES
# Decode sizes (1-16 rows: the row groups of 4 and their tails) and a prefill-like count.
ROWS = (1, 3, 16, 37)


def _backends():
    """The backends with the quantised projection (``quant.BACKENDS``; cuda refuses it)."""
    return [p for p in backend_params() if p.values[0].name in quant.BACKENDS]


def _ternary(out_features, in_features, generator):
    return torch.randint(-1, 2, (out_features, in_features), generator=generator).float()


def _case(rows, dtype, gated, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(rows, 2 * K if gated else K, dtype=dtype, mean=0.3, std=1.2, generator=gen)
    ln_weight = randn(K, dtype=dtype, mean=1.0, std=0.2, generator=gen)
    t = _ternary(N, K, gen)
    bias = randn(N, dtype=dtype, mean=0.1, std=0.5, generator=gen)
    residual = randn(rows, N, dtype=dtype, mean=-0.2, generator=gen)
    weight_scale = torch.tensor([0.37 + 0.1 * seed], dtype=dtype)
    return x, ln_weight, t, bias, residual, weight_scale


def _float64_offline(x, ln_weight, t, bias, residual, weight_scale, mode, gated, h=None):
    """transformers' offline formula in float64 from the float64 normalised row (or the given
    h), and per output element the room the tie codes leave: Σ_tie |t|·(its code's worth)."""
    if h is None:
        a = quant.relu2_glu(x.double()) if gated else x.double()
        h = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + EPS) * ln_weight.double()
    h = h.double()
    s = quant.QMAX / h.abs().amax(-1, keepdim=True).clamp(min=quant.ACT_EPS)
    q, tie = quant.float64_codes(h, s)
    acc = q @ t.double().T
    slack = tie.double() @ t.double().abs().T
    ws, b = weight_scale.double(), bias.double()
    if mode == "bitlinear":
        y, worth = acc / (ws * s) + b, 1.0 / (ws * s)
    else:
        y, worth = (acc / s + b) * ws, ws / s
    return residual.double() + y, slack * worth


def _run(backend, x, ln_weight, t, bias, residual, weight_scale, mode, gated):
    return ops.ln_linear(
        x, ln_weight, None, quant.pack(t), bias, eps=EPS, norm="rms",
        input_activation="relu2_glu" if gated else None, residual=residual,
        quant=mode, weight_scale=weight_scale, backend=backend.name,
    )  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("mode", OFFLINE)
@pytest.mark.parametrize("rows", ROWS)
def test_offline_fp32_matches_float64_up_to_ties(backend, mode, gated, rows):
    x, ln_weight, t, bias, residual, weight_scale = _case(rows, torch.float32, gated, rows)
    with backend.running():
        out = _run(backend, x, ln_weight, t, bias, residual, weight_scale, mode, gated)
    ref, slack = _float64_offline(x, ln_weight, t, bias, residual, weight_scale, mode, gated)
    err = ((out.double() - ref).abs() - slack).clamp(min=0)
    bound = ELEMENT_RTOL_FACTOR * RTOL[torch.float32] * ref.abs().max().item()
    assert_elementwise(err, ref, bound, ATOL, "output")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("mode", OFFLINE)
def test_offline_bf16_within_bf16_rounding(backend, mode, gated):
    """bf16: h is rounded to bf16 (a last-bit difference moves a code anywhere, not only at a
    tie), so the float64 formula runs on the reference's bf16 h, within bf16's tolerance."""
    x, ln_weight, t, bias, residual, weight_scale = _case(16, torch.bfloat16, gated, 5)
    with backend.running():
        out = _run(backend, x, ln_weight, t, bias, residual, weight_scale, mode, gated)
    h = quant.bitnet_norm(quant.relu2_glu(x) if gated else x, ln_weight, EPS)
    ref, _ = _float64_offline(x, ln_weight, t, bias, residual, weight_scale, mode, gated, h)
    assert_close(out, ref, RTOL[torch.bfloat16], name="output")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("rows", (1, 7))
def test_online_forward_and_every_gradient(backend, gated, rows):
    gen = torch.Generator().manual_seed(rows)
    inputs = {
        "x": randn(2, rows, 2 * K if gated else K, mean=0.3, generator=gen),
        "ln_weight": randn(K, mean=1.0, std=0.2, generator=gen),
        "weight": randn(N, K, std=0.05, generator=gen),
        "bias": randn(N, mean=0.1, generator=gen),
        "residual": randn(2, rows, N, generator=gen),
    }

    def fn(x, ln_weight, weight, bias, residual, backend):
        return ops.ln_linear(
            x, ln_weight, None, weight, bias, eps=EPS, norm="rms", residual=residual,
            input_activation="relu2_glu" if gated else None, alpha=0.8,
            quant="bitnet_online", backend=backend,
        )  # fmt: skip

    with backend.running():
        compare_to_reference(backend, fn, inputs)


@pytest.mark.parametrize("backend", _backends())
def test_online_without_norm_leaves_x_alone(backend):
    """With no norm the GEMM operand is x itself: its fake-quantised copy must not overwrite x."""
    gen = torch.Generator().manual_seed(3)
    x = randn(4, K, mean=0.2, generator=gen)
    weight = randn(N, K, std=0.05, generator=gen)
    before = x.clone()
    with backend.running():
        out = ops.ln_linear(x, None, None, weight, quant="bitnet_online", backend=backend.name)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    expected = quant.ln_linear_bitnet(x, None, weight)
    torch.testing.assert_close(out, expected)


def test_pack_layout():
    """Byte b of a 128-wide block holds k = 32·i + b at bits 2i (the kernels' layout), unpack
    inverts pack, and transformers' packed BitLinear layout reads back as its ternary weight."""
    gen = torch.Generator().manual_seed(0)
    t = _ternary(5, 2 * QUANT_PACK_UNIT, gen)
    packed = quant.pack(t)
    assert packed.shape == (5, QUANT_PACK_UNIT // 2) and packed.dtype == torch.uint8
    for k in (0, 1, 31, 32, 95, 127, 128, 200, 255):
        blk, i, b = divmod(k, QUANT_PACK_UNIT)[0], (k % QUANT_PACK_UNIT) // 32, k % 32
        codes = (packed[:, 32 * blk + b] >> (2 * i)) & 3
        assert torch.equal(codes.to(torch.int64) - 1, t[:, k].to(torch.int64))
    assert torch.equal(quant.unpack(packed), t)
    transformers = pytest.importorskip("transformers")
    del transformers
    from transformers.integrations.bitnet import pack_weights

    for out_features in (8, 10):
        tt = _ternary(out_features, 7, gen).to(torch.int8)
        hf = pack_weights(tt.clone())
        assert torch.equal(quant.unpack_hf(hf, out_features), tt)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"in_features": 100}, "needs in_features a multiple of 128"),
        ({"weight_dtype": torch.int8}, "weight must have dtype torch.uint8"),
        ({"weight_cols": 16}, "weight must have shape (out_features, 64) for quant="),
        ({"weight_scale": None}, "needs weight_scale, a tensor of shape (1,)"),
        ({"weight_scale": torch.ones(2)}, "weight_scale must have shape (1,), got (2,)"),
        ({"norm": "layer"}, "takes norm='rms' or no norm, input_activation"),
        ({"quant": "int4"}, "quant must be one of 'none', 'bitnet_online'"),
    ],
)
@pytest.mark.parametrize("backend", _backends())
def test_bad_arguments_refused_alike(backend, change, error):
    k = change.get("in_features", K)
    x = randn(3, k)
    weight = torch.zeros(
        N, change.get("weight_cols", k // 4), dtype=change.get("weight_dtype", torch.uint8)
    )
    kwargs = {"quant": change.get("quant", "bitnet_offline")}
    kwargs["weight_scale"] = change.get("weight_scale", torch.ones(1))
    with (
        backend.running(),
        pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")),
    ):
        ops.ln_linear(
            x, torch.ones(k), None, weight, norm=change.get("norm", "rms"),
            backend=backend.name, **kwargs,
        )  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
def test_weight_scale_refused_online(backend):
    with backend.running(), pytest.raises(ValueError, match="weight_scale must be None"):
        ops.ln_linear(
            randn(2, K), None, None, randn(N, K), quant="bitnet_online",
            weight_scale=torch.ones(1), backend=backend.name,
        )  # fmt: skip


def test_offline_has_no_backward_on_cpu():
    from tests.harness import require_backend

    require_backend("cpu")
    gen = torch.Generator().manual_seed(1)
    x = randn(2, K, generator=gen).requires_grad_()
    out = ops.ln_linear(
        x, None, None, quant.pack(_ternary(N, K, gen)), quant="bitnet_offline",
        weight_scale=torch.ones(1), backend="cpu",
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="has no backward"):
        out.sum().backward()


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_a_backend_without_quantised_kernels_refuses(online):
    """cuda has no quantised kernels: it refuses (run by the emulated CUDA stage,
    MAGNETO_CUDA_EMULATE=1), rather than computing an unquantised projection."""
    from tests.harness import BY_NAME

    assert "cuda" not in quant.BACKENDS
    gen = torch.Generator().manual_seed(2)
    weight = randn(N, K, generator=gen) if online else quant.pack(_ternary(N, K, gen))
    kwargs = {"quant": "bitnet_online"} if online else {
        "quant": "bitnet_offline", "weight_scale": torch.ones(1)}  # fmt: skip
    cuda = BY_NAME["cuda"]
    with cuda.running(), pytest.raises(NotImplementedError, match="CUDA backend has no quant"):
        ops.ln_linear(
            randn(2, K, device=cuda.device, generator=gen), None, None,
            weight.to(cuda.device), norm="rms", backend="cuda",
            **{k: v.to(cuda.device) if torch.is_tensor(v) else v for k, v in kwargs.items()},
        )  # fmt: skip
