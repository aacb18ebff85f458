"""BitNet b1.58's quantised projection: the reference formula (the specification of the quantised
``ln_linear`` mode) and its float64 evaluation for tests.

The spec is transformers' own code (``transformers/integrations/bitnet.py``, 5.23.0), step by
step and in its dtypes:

- activations, per token (``ActQuant``, ``AutoBitLinear``): in float32,
  ``s = 127 / max(|h|).clamp(min=1e-5)``, ``q = round(h·s).clamp(-128, 127)`` (torch rounds
  half to even), and the fake-quantised ``q / s`` back in h's dtype;
- weights, online (``WeightQuant``, master weights): in float32,
  ``s_w = 1 / mean(|W|).clamp(min=1e-5)``, ``t = round(W·s_w).clamp(-1, 1)``, ``t / s_w`` back
  in W's dtype; offline (``AutoBitLinear(online_quant=False)``): W holds t, and the output is
  multiplied by ``weight_scale`` after the linear (bias included);
- ``BitLinear`` (2-bit packed): t unpacked to the layer's dtype, ``y = (q @ t.T) /
  (weight_scale · s)`` and the bias added after (its steps' dtypes: ``_bitlinear``);
- straight-through backward through both quantisations (``grad_input = grad_output``): the
  linear's gradients are taken at the fake-quantised operands.

``h`` is the normalised row: BitNet's ``BitNetRMSNorm`` (float32, rounded to x's dtype, times
its weight) of x, or of ``relu2(gate)·up`` for down_proj.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from magneto_kernels.codes import QUANT_PACK_UNIT, QUANTS

ACT_EPS = 1e-5
"""transformers' clamp of the per-token absmax (``ActQuant``, ``BitLinear.activation_quant``)."""
WEIGHT_EPS = 1e-5
"""transformers' clamp of the per-tensor absmean (``WeightQuant``)."""
QMAX = 127
QUANT_MODES = tuple(q for q in QUANTS if q != "none")
"""``AutoBitLinear`` with master weights (training), with stored ternary weights and
``weight_scale`` (the 2B-4T checkpoint), and ``BitLinear`` (packed 2-bit weights)."""
OFFLINE_MODES = ("bitnet_offline", "bitlinear")
"""The modes whose ``ln_linear`` weight is packed (``pack``): inference only."""
BACKENDS = ("reference", "cpu", "triton", "cuda")
"""The backends with kernels for the quantised modes (every kernel backend; one without them must
refuse them: tests/test_quant_op.py)."""


def act_codes(h: Tensor, amax: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(q, s) of ``ActQuant``: the int8 codes (as h's float32 values) and the per-row scale.
    ``amax``: max|h| per row given (h's leading shape; tensor parallelism: the max over every
    shard of the row) instead of the row's own."""
    h = h.float()
    amax = h.abs().amax(dim=-1, keepdim=True) if amax is None else amax.float().unsqueeze(-1)
    s = QMAX / amax.clamp(min=ACT_EPS)
    return (h * s).round().clamp(-QMAX - 1, QMAX), s


def weight_codes(weight: Tensor, absmean: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(t, s_w) of ``WeightQuant``: the ternary codes (float32) and the per-tensor scale.
    ``absmean``: mean|W| given (tensor parallelism: the whole weight's) instead of weight's."""
    w = weight.float()
    absmean = w.abs().mean() if absmean is None else absmean.float().reshape(())
    s = 1.0 / absmean.clamp(min=WEIGHT_EPS)
    return (w * s).round().clamp(-1, 1), s


class _FakeQuant(torch.autograd.Function):
    """transformers' ``ActQuant`` / ``WeightQuant``: t fake-quantised by ``codes`` (act_codes or
    weight_codes) in t's dtype, straight-through backward."""

    @staticmethod
    def forward(ctx, t, codes, scale):
        q, s = codes(t, scale)
        return (q / s).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quant(t: Tensor, codes, scale: Optional[Tensor] = None) -> Tensor:
    """t fake-quantised by ``codes`` (act_codes or weight_codes, given ``scale``: their amax or
    absmean), straight-through backward."""
    return _FakeQuant.apply(t, codes, scale)


def bitnet_norm(
    x: Tensor, ln_weight: Optional[Tensor], eps: float, rstd: Optional[Tensor] = None
) -> Tensor:
    """``BitNetRMSNorm``: float32, rounded to x's dtype, times the weight. ``rstd``: the rows'
    1/rms given (x's leading shape; the sharded norm's, over every shard) instead of x's own."""
    if ln_weight is None:
        return x
    h = x.float()
    if rstd is None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        h = h * rstd.float().reshape(*x.shape[:-1], 1)
    return ln_weight * h.to(x.dtype)


def relu2_glu(x: Tensor) -> Tensor:
    """BitNet's down_proj input, ``relu2(gate)·up`` of x = [gate | up], as transformers runs it."""
    gate, up = x.chunk(2, dim=-1)
    return torch.square(torch.relu(gate)) * up


def ln_linear_bitnet(
    x: Tensor,
    ln_weight: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    quant: str = "bitnet_online",
    weight_scale: Optional[Tensor] = None,
    eps: float = 1e-6,
    input_activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    alpha: float = 1.0,
    rstd: Optional[Tensor] = None,
    row_amax: Optional[Tensor] = None,
) -> Tensor:
    """``alpha·residual + Q(BitNetRMSNorm(in_act(x)))`` with Q the quantised projection of mode
    ``quant`` (``QUANT_MODES``), as transformers computes it (top of the file). ``weight``: the
    master weight (online), the ternary weight (offline) or the unpacked ternary weight of a
    ``BitLinear``; ``weight_scale``: the stored scale (offline modes; shape (1,)), or online the
    whole weight's mean|W| given (tensor parallelism). Tensor parallelism's shards of a row:
    ``rstd`` the norm's statistic and ``row_amax`` max|h| over every shard, given."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    given = weight_scale is not None
    if (quant != "bitnet_online" or given) and (not given or weight_scale.numel() != 1):
        shape = tuple(weight_scale.shape) if given else None
        raise ValueError(
            f"quant={quant!r} needs a per-tensor weight_scale of shape (1,), got {shape}"
        )
    if input_activation not in (None, "relu2_glu"):
        raise ValueError(f"input_activation must be None or 'relu2_glu', got {input_activation!r}")
    a = relu2_glu(x) if input_activation == "relu2_glu" else x
    h = bitnet_norm(a, ln_weight, eps, rstd)
    if quant == "bitlinear":
        y = _bitlinear(h, weight, weight_scale, bias, row_amax)
    else:
        online = quant == "bitnet_online"
        w = fake_quant(weight, weight_codes, weight_scale) if online else weight
        y = F.linear(fake_quant(h, act_codes, row_amax), w, bias)
        if quant == "bitnet_offline":
            y = y * weight_scale
    return y if residual is None else alpha * residual + y


def ln_linear_group_bitnet(
    x: Tensor,
    ln_weight: Optional[Tensor],
    weights: list[Tensor],
    biases: Optional[list[Optional[Tensor]]] = None,
    *,
    quant: str = "bitnet_online",
    weight_scales: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> tuple[Tensor, ...]:
    """``ln_linear_bitnet`` of one input for several weights (q/k/v, gate/up), the row
    normalised and its codes taken once: one output per weight, ``weight_scales`` (offline
    modes) of shape (len(weights),), ``weight_scales[i]`` the scale of ``weights[i]``. The
    same values as one ``ln_linear_bitnet`` per weight: a row's codes do not depend on the
    weight."""
    n = len(weights)
    biases = [None] * n if biases is None else biases
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if quant != "bitnet_online" and (weight_scales is None or weight_scales.shape != (n,)):
        shape = None if weight_scales is None else tuple(weight_scales.shape)
        raise ValueError(f"quant={quant!r} needs weight_scales of shape ({n},), got {shape}")
    h = bitnet_norm(x, ln_weight, eps)
    if quant == "bitlinear":
        return tuple(
            _bitlinear(h, w, weight_scales[i : i + 1], b)
            for i, (w, b) in enumerate(zip(weights, biases))
        )
    hq = fake_quant(h, act_codes)
    if quant == "bitnet_online":
        return tuple(F.linear(hq, fake_quant(w, weight_codes), b) for w, b in zip(weights, biases))
    return tuple(
        F.linear(hq, w, b) * weight_scales[i : i + 1]
        for i, (w, b) in enumerate(zip(weights, biases))
    )


def _bitlinear(
    h: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Optional[Tensor],
    amax: Optional[Tensor] = None,
) -> Tensor:
    """``BitLinear.forward`` after its optional norm. Its ``activation_quant`` and
    ``post_quant_process`` are ``torch.compile``'d, and inductor computes a bf16/fp16 kernel's
    pointwise steps in float32, rounding only what it returns: s and h·s in float32, s returned
    (and divided by) in h's dtype, the division in float32 rounded once."""
    amax = h.float().abs().amax(dim=-1, keepdim=True) if amax is None else amax.unsqueeze(-1)
    s = QMAX / amax.float().clamp(min=ACT_EPS)
    q = (h.float() * s).round().clamp(-QMAX - 1, QMAX).to(torch.int8)
    y = F.linear(q.to(weight.dtype), weight)
    y = (y.float() / (weight_scale.float() * s.to(h.dtype).float())).to(y.dtype)
    return y if bias is None else y + bias.view(1, -1).expand_as(y)


def pack(ternary: Tensor) -> Tensor:
    """The offline modes' packed weight, the layout the kernels read (``csrc/common.h``): a
    ternary (out_features, in_features) weight, in_features a multiple of ``QUANT_PACK_UNIT``
    (128), as (out_features, in_features / 4) uint8. In each block of 128 k (32 bytes), byte b
    holds the codes c = t + 1 of k = 32·i + b at bits 2i..2i+1 (i = 0..3): a 32-byte load
    shifted by 2i and masked gives 32 consecutive codes, against one 32-byte load of the int8
    activation row. ValueError naming the problem for other widths or non-ternary values."""
    out_features, in_features = ternary.shape
    if in_features % QUANT_PACK_UNIT:
        raise ValueError(
            f"in_features must be a multiple of {QUANT_PACK_UNIT} to pack, got {in_features}"
        )
    if not bool(((ternary == -1) | (ternary == 0) | (ternary == 1)).all()):
        raise ValueError("the weight to pack is not ternary (values other than -1, 0, 1)")
    codes = (ternary.to(torch.int16) + 1).to(torch.uint8)
    codes = codes.reshape(out_features, in_features // QUANT_PACK_UNIT, 4, 32)
    packed = codes[:, :, 0] | codes[:, :, 1] << 2 | codes[:, :, 2] << 4 | codes[:, :, 3] << 6
    return packed.reshape(out_features, in_features // 4).contiguous()


def unpack(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ternary (out_features, in_features) weight of ``pack``'s layout, in ``dtype``."""
    out_features = packed.shape[0]
    blocks = packed.reshape(out_features, -1, 1, 32)
    codes = torch.cat([(blocks >> (2 * i)) & 3 for i in range(4)], dim=2)
    return codes.reshape(out_features, -1).to(dtype) - 1


def unpack_hf(packed: Tensor, out_features: int) -> Tensor:
    """The ternary weight (int8) of transformers' packed ``BitLinear`` layout, an input format:
    (ceil(out_features / 4), in_features) uint8, packed row r holding output rows
    r + i·ceil(out_features / 4) at bits 2i..2i+1 as codes t + 1."""
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(4)], dim=0)
    return codes[:out_features].to(torch.int8) - 1


def float64_codes(h: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 evaluation of the activation codes of h (float64) at scale s (float64), and
    where a code sits at a rounding tie: ``|frac(h·s) − 0.5|`` below ``tie_width``, the room one
    last-bit difference of an fp32 h·s leaves (2⁻¹⁷ relative of |h·s| ≤ 128, i.e. 128 ulps of
    fp32 at 127 as a margin of the norm's rounding too), where the kernel's float32 h may round
    either way. Tests allow one code of difference there and nowhere else."""
    v = h * s
    q = v.round().clamp(-QMAX - 1, QMAX)
    tie = ((v - v.floor()) - 0.5).abs() <= v.abs().clamp(min=1.0) * 2.0**-17
    return q, tie
