"""Attention masks: what each entry point accepts, and the one mask handed to SDPA.

``magneto.MultiheadAttention`` reads a mask by its dtype:

- bool: True marks a masked position (``torch.nn``'s convention);
- floating: added to the scores (``torch.nn``; torchscale's additive masks), finite values
  included, so a float ``key_padding_mask`` is a per-key bias as in ``torch.nn``;
- integer (int64, uint8, ...): torchscale's 0/1 masks, nonzero = masked. ``torch.nn`` refuses
  them and torchscale's ``MultiheadAttention`` would add them to the scores (masking nothing),
  but torchscale's ``EncoderLayer`` reads them as nonzero = masked, which is what its users
  mean.

The entry points convert before that:

- torch.nn's (``magneto.nn``): ``torch_mask`` refuses what ``torch.nn`` refuses (integer masks),
  with an error naming the argument; bool and float pass as they are, so the result is torch's.
- torchscale's (``Encoder``, ``Decoder``, ``EncoderDecoder``, ``BEiT3`` and their layers):
  ``torchscale_mask`` reads a key padding mask, and an encoder's ``attn_mask``, as torchscale
  does, nonzero = masked whatever the dtype; a decoder layer's ``self_attn_mask`` follows the
  rules above (torchscale adds its float mask).

``sdpa_mask`` merges a key padding mask (batch, src_len), an attention mask (tgt_len, src_len)
or (batch·heads, tgt_len, src_len), a causal flag and a relative position bias (``rel_pos``,
added to the scores after the masks, as torchscale adds it) into SDPA's ``attn_mask`` (bool,
True = attend, or additive float) and ``is_causal``; a causal query i of the last tgt_len
positions sees the keys up to its own position (decoding with a cache: bottom-right aligned).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def torch_mask(mask: Optional[Tensor], name: str) -> Optional[Tensor]:
    """``mask`` as ``torch.nn`` takes it (bool or floating), else ValueError naming ``name``."""
    if mask is None or mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    raise ValueError(
        f"{name} must be bool (True = masked) or floating (added to the scores), as torch.nn "
        f"takes it; got {mask.dtype}. For torchscale's 0/1 masks (nonzero = masked) pass "
        f"{name}.bool()"
    )


def torchscale_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """torchscale's reading of a padding mask or an encoder's ``attn_mask``: nonzero = masked."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask != 0


def _masked(mask: Tensor) -> Tensor:
    """True where a bool or integer mask masks."""
    return mask if mask.dtype == torch.bool else mask != 0


def sdpa_mask(
    bsz: int,
    heads: int,
    tgt_len: int,
    src_len: int,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    is_causal: bool,
    q: Tensor,
    rel_pos: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], bool]:
    """SDPA's ``attn_mask`` (bool, True = attend, or additive float in q's dtype) and
    ``is_causal`` for these masks, each read by its dtype (module docstring). ``rel_pos``: an
    additive bias, torchscale's (batch·heads, tgt_len, src_len) or any 4-D tensor that
    broadcasts to (batch, heads, tgt_len, src_len) (``magneto.relative_position``)."""
    if key_padding_mask is None and attn_mask is None and rel_pos is None:
        if not is_causal or tgt_len == 1:
            return None, False
        if tgt_len == src_len:
            return None, True
    keep = None  # bool, True = attend, broadcastable to (bsz, heads, tgt, src)
    additive = None  # float, likewise
    if is_causal:
        keep = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device)
        keep = keep.tril(src_len - tgt_len)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(
                f"key_padding_mask must have shape (batch, src_len) = "
                f"{(bsz, src_len)}, got {tuple(key_padding_mask.shape)}"
            )
        padding = key_padding_mask.to(q.device)[:, None, None, :]
        if padding.is_floating_point():
            additive = padding.to(q.dtype)
        else:
            keep = ~_masked(padding) if keep is None else keep & ~_masked(padding)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.device)
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (tgt_len, src_len):
            attn_mask = attn_mask[None, None]
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (bsz * heads, tgt_len, src_len):
            attn_mask = attn_mask.view(bsz, heads, tgt_len, src_len)
        else:
            raise ValueError(
                f"attn_mask must have shape (tgt_len, src_len) = {(tgt_len, src_len)} "
                f"or (batch*heads, tgt_len, src_len), got {tuple(attn_mask.shape)}"
            )
        if attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)
            additive = attn_mask if additive is None else additive + attn_mask
        else:
            keep = ~_masked(attn_mask) if keep is None else keep & ~_masked(attn_mask)
    if rel_pos is not None:
        rel_pos = _bias(rel_pos, bsz, heads, tgt_len, src_len).to(q.device, q.dtype)
        additive = rel_pos if additive is None else additive + rel_pos
    if additive is None:
        return keep, False
    if keep is not None:
        additive = additive.masked_fill(~keep, float("-inf"))
    return additive, False


def _bias(rel_pos: Tensor, bsz: int, heads: int, tgt_len: int, src_len: int) -> Tensor:
    """``rel_pos`` broadcastable to (batch, heads, tgt_len, src_len)."""
    full = (bsz, heads, tgt_len, src_len)
    if rel_pos.dim() == 3 and tuple(rel_pos.shape) == (bsz * heads, tgt_len, src_len):
        return rel_pos.view(full)
    if rel_pos.dim() == 4 and all(n in (1, m) for n, m in zip(rel_pos.shape, full)):
        return rel_pos
    raise ValueError(
        f"rel_pos must have shape (batch*heads, tgt_len, src_len) = "
        f"{(bsz * heads, tgt_len, src_len)} or broadcast to (batch, heads, tgt_len, src_len) = "
        f"{full}, got {tuple(rel_pos.shape)}"
    )


def masked_scores(scores: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
    """``scores`` (…, tgt, src) with SDPA's ``attn_mask``/``is_causal`` applied as SDPA does."""
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask
