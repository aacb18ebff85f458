"""xPos rotary positions (Sun et al. 2022, "A Length-Extrapolatable Transformer") as torchscale
0.3.0 applies them (``torchscale/component/xpos_relative_position.py``, ``XPOS``).

A query or key row at position ``n`` is rotated pairwise, each pair (x[2i], x[2i+1]) by the angle
``n·θ_i``, and scaled by ``ζ_i^(m/scale_base)`` (keys by its inverse, ``downscale``):

    θ_i = 10000^(-i / (head_dim/2)),   ζ_i = (2i + 0.4·head_dim) / (1.4·head_dim)

so that a query-key product depends on ``n_q − n_k`` only and decays with it. Two positions per
row, exactly as torchscale numbers them for a call on ``length`` rows at ``offset``:

- the rotation angle uses ``n = 0 … length+offset−1``, of which the call's rows are the last
  ``length``;
- the scale exponent uses ``m = n + min_pos``, centred on the sequence,
  ``min_pos = floor(−(length + offset) / 2)``.

How torchscale's self-attention calls it (``multihead_attention.py``), which the attention
reproduces: ``q`` is multiplied by ``head_dim**-0.5`` first; the keys, the whole cache with the
new ones appended, get ``offset=0, downscale=True``; the queries get ``offset = src_len − 1``
during incremental decoding after the first step (``is_first_step`` false), else 0. The cache
holds keys before rotation, so every step rotates all of them again (the centre moves with the
length). Cross-attention has no xPos.

The tables are computed in float32 and the rotation runs in float32, whatever ``x``'s dtype; the
result has ``x``'s dtype. (torchscale computes its tables in its buffer's dtype: bf16 for a
model cast to bf16.) The float32 operations are torchscale's, in its order, so float32 results
are bit-identical to ``XPOS``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def xpos_scale(head_dim: int, device=None) -> Tensor:
    """ζ_i = (2i + 0.4·head_dim) / (1.4·head_dim), i < head_dim/2, float32: torchscale's
    ``XPOS.scale`` buffer, which its state dicts hold as ``self_attn.xpos.scale``."""
    return (torch.arange(0, head_dim, 2, device=device) + 0.4 * head_dim) / (1.4 * head_dim)


def xpos_tables(
    length: int,
    head_dim: int,
    offset: int = 0,
    *,
    downscale: bool = False,
    scale_base: int = 512,
    device=None,
) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each (length, head_dim/2) float32, the scale folded in: the rows of the
    last ``length`` of ``length + offset`` positions."""
    total = length + offset
    min_pos = -total // 2
    zeta = xpos_scale(head_dim, device)
    positions = torch.arange(min_pos, total + min_pos, device=device).to(zeta).div(scale_base)
    scale = zeta ** positions[:, None]
    half = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, device=device) / half))
    angle = torch.outer(torch.arange(0, total, dtype=torch.float, device=device), inv_freq)
    sin, cos, scale = angle.sin()[-length:], angle.cos()[-length:], scale[-length:]
    if downscale:
        scale = 1 / scale
    return cos * scale, sin * scale


def apply_xpos(
    x: Tensor, offset: int = 0, *, downscale: bool = False, scale_base: int = 512
) -> Tensor:
    """``x`` (..., length, head_dim) with xPos applied to its rows at positions ``offset`` …
    ``offset + length − 1`` (torchscale's ``XPOS(head_dim, scale_base)(x, offset, downscale)``,
    which takes (batch·heads, length, head_dim); here any leading dimensions)."""
    if x.dim() < 2:
        raise ValueError(f"x must be (..., length, head_dim), got shape {tuple(x.shape)}")
    length, head_dim = x.shape[-2], x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"xPos rotates pairs: head_dim must be even, got {head_dim}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    cos, sin = xpos_tables(
        length, head_dim, offset, downscale=downscale, scale_base=scale_base, device=x.device
    )
    pairs = x.float().unflatten(-1, (head_dim // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    # torchscale: x·cos + rotate_every_two(x)·sin, rotate_every_two(x) = (−odd, even) per pair
    rotated = torch.stack((even * cos + (-odd) * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def apply_xpos_qk(
    q: Tensor, k: Tensor, offset: int = 0, *, scale_base: int = 512
) -> tuple[Tensor, Tensor]:
    """``(q, k)`` rotated as torchscale's self-attention rotates them: the keys (all cached
    positions) at offset 0, downscaled; the queries at ``offset`` (``src_len − 1`` for a decoding
    step after the first, else 0). Layout (batch, heads, length, head_dim) or torchscale's
    (batch·heads, length, head_dim)."""
    k = apply_xpos(k, 0, downscale=True, scale_base=scale_base)
    return apply_xpos(q, offset, scale_base=scale_base), k
