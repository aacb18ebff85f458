"""Pure-PyTorch reference of every magneto op: the specification each backend is tested against.

Everything here is plain differentiable PyTorch (autograd supplies the gradients), written for
clarity, not speed. Run it on float64 inputs to get the oracle the tests compare against.

Numerics that every backend shares:
- norm statistics and the normalisation are computed in float32 (float64 for float64 inputs);
  the normalised row is rounded to the input dtype before it enters the matrix product;
- dropout keeps an element iff ``philox(seed, index) >= dropout_threshold(p)``, where ``index``
  is the element's row-major position in the (rows, out_features) output: the mask is a pure
  function of the seed, so backward regenerates it and every backend draws the same one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from magneto_kernels import quant as bitnet
from magneto_kernels.codes import (
    GATED_ACTIVATIONS,
    NORMS,
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
    PHILOX_ROUNDS,
    canonical_activation,
    dropout_threshold,
)


def apply_activation(x: Tensor, name: Optional[str]) -> Tensor:
    name = canonical_activation(name)
    if name == "none":
        return x
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    return F.silu(x)


def apply_input_activation(x: Tensor, name: str) -> Tensor:
    """ln_linear's input activation: apply_activation, or for a gated one (GATED_ACTIVATIONS)
    ``act(gate)·up`` with ``x = [gate | up]`` split along the last dimension."""
    if name in GATED_ACTIVATIONS:
        gate, up = x.chunk(2, dim=-1)
        return apply_activation(gate, GATED_ACTIVATIONS[name]) * up
    return apply_activation(x, name)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, norm: str
) -> Tensor:
    """LayerNorm or RMSNorm over the last dimension, in float32 (float64 for float64 input).

    Returns the result in the statistics dtype; callers round it to the dtype they need.
    """
    dt = _stat_dtype(x)
    width = (x.shape[-1],)
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    if norm == "layer":
        return F.layer_norm(x.to(dt), width, w, b, eps)
    if norm == "rms":
        return F.rms_norm(x.to(dt), width, w, eps)
    if norm == "none":
        return x.to(dt)
    raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    norm: str = "layer",
) -> Tensor:
    """``N(x)``: LayerNorm (``norm="layer"``) or RMSNorm (``norm="rms"``) over the last dim."""
    return normalize(x, weight, bias, eps, norm).to(x.dtype)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    norm: str = "layer",
) -> tuple[Tensor, Tensor]:
    """Post-LN / DeepNorm residual: ``s = alpha·residual + x`` and ``(N(s), s)``.

    ``s`` is formed in the statistics dtype; the norm reads that unrounded sum and both outputs
    are rounded to x's dtype.
    """
    dt = _stat_dtype(x)
    s = alpha * residual.to(dt) + x.to(dt)
    return normalize(s, weight, bias, eps, norm).to(x.dtype), s.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Dropout: Philox4x32-10 keyed by the seed, counter = (index mod 2^32, index >> 32, 0, 0).
# Bit-compatible with triton.language.randint (first output word) for indices below 2^32.

_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a·b for a < 2^32 and int64 b in [0, 2^32), without overflow."""
    t = a * (b & 0xFFFF)  # < 2^48
    u = a * (b >> 16)  # < 2^48;  a·b = u·2^16 + t
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _U32
    return hi, lo


def philox(seed: Tensor, index: Tensor) -> Tensor:
    """First 32-bit word of Philox4x32-10(key=seed, counter=(index lo, index hi, 0, 0)).

    ``seed``: 0-d int64 tensor; ``index``: int64 tensor of non-negative indices. Returns int64
    values in [0, 2^32).
    """
    seed = seed.to(device=index.device, dtype=torch.int64)
    k0 = seed & _U32
    k1 = (seed >> 32) & _U32
    c0 = index & _U32
    c1 = index >> 32
    c2 = torch.zeros_like(index)
    c3 = torch.zeros_like(index)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _U32
        k1 = (k1 + PHILOX_KEY_B) & _U32
    return c0


def dropout_mask(seed: Tensor, shape: tuple[int, ...], p: float, device=None) -> Tensor:
    """Boolean keep-mask of ``shape`` (row-major element indices) for dropout probability p."""
    numel = 1
    for s in shape:
        numel *= s
    index = torch.arange(numel, dtype=torch.int64, device=device or seed.device).view(shape)
    return philox(seed, index) >= dropout_threshold(p)


def dropout(x: Tensor, p: float, seed: Optional[Tensor]) -> Tensor:
    """Philox dropout of x (row-major indices over x's shape); identity when p == 0."""
    if p == 0.0:
        return x
    keep = dropout_mask(seed, tuple(x.shape), p, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------------------------


def ln_linear(
    x: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    eps: float = 1e-5,
    norm: str = "layer",
    input_activation: Optional[str] = None,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    alpha: float = 1.0,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    mean: Optional[Tensor] = None,
    rstd: Optional[Tensor] = None,
) -> Tensor:
    """``alpha·residual + dropout(act(N(in_act(x)) @ weight.T + bias))``.

    ``N`` is skipped when ``ln_weight`` is None. The dropout mask is indexed over the output
    viewed as (rows, out_features), rows being x's leading dimensions flattened. ``mean`` and
    ``rstd`` (per row, the sharded norm's over every shard): N normalises with them instead of
    x's own statistics.
    """
    a = apply_input_activation(x, input_activation)
    if ln_weight is None:
        h = a
    elif rstd is not None:
        h = normalize_with(a, ln_weight, ln_bias, mean, rstd, norm).to(weight.dtype)
    else:
        h = normalize(a, ln_weight, ln_bias, eps, norm).to(weight.dtype)
    y = apply_activation(F.linear(h, weight, bias), activation)
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("dropout_p > 0 needs a seed")
        y = dropout(y, dropout_p, seed)
    if residual is not None:
        y = alpha * residual + y
    return y


def ln_linear_group(
    x: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    weights: list[Tensor],
    biases: list[Optional[Tensor]],
    *,
    eps: float = 1e-5,
    norm: str = "layer",
) -> tuple[Tensor, ...]:
    """``tuple(N(x) @ w.T + b for w, b in zip(weights, biases))``: ``ln_linear`` of each weight
    with one normalised x (``N`` skipped when ``ln_weight`` is None)."""
    h = x if ln_weight is None else normalize(x, ln_weight, ln_bias, eps, norm).to(weights[0].dtype)
    return tuple(F.linear(h, w, b) for w, b in zip(weights, biases))


# ----------------------------------------------------------------------------------------------
# The sharded norm's entry points (magneto/parallel/functional.py): the norm's statistics and its
# backward's two row sums are reduced over the shards of a row between these calls.


def _per_row(t: Tensor, like: Tensor, dt: torch.dtype) -> Tensor:
    """A (rows,) or (rows, k) statistic viewed with like's leading dimensions."""
    return t.to(dt).reshape(*like.shape[:-1], -1)


def normalize_with(
    a: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    norm: str,
) -> Tensor:
    """N(a) with the given per-row statistics (mean unused for RMSNorm), in the statistics
    dtype."""
    dt = _stat_dtype(a)
    xc = a.to(dt) - _per_row(mean, a, dt) if norm == "layer" else a.to(dt)
    y = xc * _per_row(rstd, a, dt)
    y = y if weight is None else y * weight.to(dt)
    return y if bias is None else y + bias.to(dt)


def norm_stats(x: Tensor, norm: str = "layer", input_activation: str = "none"):
    """This shard's (mean, M2) of each row of in_act(x) as float32 (rows,) (float64 for float64
    x): M2 the sum of squared deviations from the shard's mean; for RMSNorm mean empty and M2
    the sum of squares."""
    a = apply_input_activation(x, input_activation)
    dt = _stat_dtype(x)
    af = a.to(dt).reshape(-1, a.shape[-1])
    if norm == "rms":
        return af.new_empty((0,)), af.square().sum(-1)
    mean = af.mean(-1)
    return mean, (af - mean.unsqueeze(-1)).square().sum(-1)


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


def ln_linear_backward_partial(
    grad_out, x, ln_weight, ln_bias, weight, mean, rstd, preact, seed, norm, input_activation,
    activation, dropout_p, output_mask, quant="none", weight_scale=None, row_amax=None,
):  # fmt: skip
    """ln_linear's backward up to the norm's: (dh, row_sums, dweight, dbias), dh the gradient at
    h = N(in_act(x)) (h recomputed from mean and rstd) and row_sums this shard's
    [Σg, Σg·xhat] per row (g = dh·ln_weight; [Σg·xhat] for RMSNorm), in the statistics dtype.
    ``quant="bitnet_online"``: straight-through, dh and dweight at the fake-quantised weight
    and h (``weight_scale`` and ``row_amax`` the forward's, given)."""
    a = apply_input_activation(x, input_activation)
    with torch.enable_grad():
        p = (preact if activation != "none" else torch.zeros_like(grad_out)).detach()
        p.requires_grad_()
        y = dropout(apply_activation(p, activation), dropout_p, seed)
        (dz,) = torch.autograd.grad(y, p, grad_out)
    if quant == "none":
        h = normalize_with(a, ln_weight, ln_bias, mean, rstd, norm).to(weight.dtype)
        w = weight
    else:
        h = bitnet.fake_quant(
            bitnet.bitnet_norm(a, ln_weight, 0.0, rstd), bitnet.act_codes, row_amax
        )
        w = bitnet.fake_quant(weight, bitnet.weight_codes, weight_scale)
    rows_dz, rows_h = dz.reshape(-1, dz.shape[-1]), h.reshape(-1, h.shape[-1])
    dh = dz @ w
    dt = _stat_dtype(x)
    xhat = normalize_with(a, None, None, mean, rstd, norm)
    g = dh.to(dt) if ln_weight is None else dh.to(dt) * ln_weight.to(dt)
    sums = [(g * xhat).sum(-1)] if norm == "rms" else [g.sum(-1), (g * xhat).sum(-1)]
    row_sums = torch.stack(sums, -1).reshape(-1, len(sums)).float()
    if dt == torch.float64:
        row_sums = row_sums.double()
    return (
        dh if output_mask[0] else _empty(x),
        row_sums if output_mask[0] else _empty(x),
        (rows_dz.t() @ rows_h).to(weight.dtype) if output_mask[1] else _empty(x),
        rows_dz.sum(0).to(weight.dtype) if output_mask[2] else _empty(x),
    )


def layer_norm_backward(
    grad_y, x, weight, bias, mean, rstd, grad_accum, norm, output_mask,
    input_activation="none", row_means=None,
):  # fmt: skip
    """(dx, dweight, dbias) of ``N(in_act(x))`` at grad_y, the statistics given:
    ``da = rstd·(g − mean(g) − xhat·mean(g·xhat))`` with g = grad_y·weight, the two row means
    (one for RMSNorm) x's own or, given as row_means ((rows, 2) [mean(g), mean(g·xhat)], (rows,
    1) for RMSNorm), those over every shard of the row."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(input_activation != "none")
        a = apply_input_activation(xg, input_activation)
    dt = _stat_dtype(x)
    xhat = normalize_with(a.detach(), None, None, mean, rstd, norm)
    dy = grad_y.to(dt)
    g = dy if weight is None else dy * weight.to(dt)
    if row_means is None:
        mean_g = g.mean(-1, keepdim=True)
        mean_gxhat = (g * xhat).mean(-1, keepdim=True)
    else:
        means = _per_row(row_means, x, dt)
        mean_g, mean_gxhat = means[..., :1], means[..., -1:]
    if norm == "rms":
        mean_g = torch.zeros_like(mean_g)
    da = _per_row(rstd, x, dt) * (g - mean_g - xhat * mean_gxhat)
    dx = da if input_activation == "none" else torch.autograd.grad(a, xg, da.to(a.dtype))[0]
    if grad_accum is not None:
        dx = dx + grad_accum.to(dt)
    rows = tuple(range(x.dim() - 1))
    return (
        dx.to(x.dtype) if output_mask[0] else _empty(x),
        (dy * xhat).sum(rows).to(weight.dtype)
        if output_mask[1] and weight is not None
        else _empty(x),
        dy.sum(rows).to(bias.dtype) if output_mask[2] and bias is not None else _empty(x),
    )


def int8_head(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The int8 output projection: ``(x @ weight.T)·scale (+ bias)`` with weight int8, the
    products summed and scaled in float32 (float64 for float64 x) and rounded to x's dtype once,
    the bias added before that rounding."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = (x.to(acc) @ weight.to(acc).T) * scale.to(acc)
    return (y if bias is None else y + bias.to(acc)).to(x.dtype)
