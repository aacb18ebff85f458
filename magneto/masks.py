"""Attention masks: the one mask handed to SDPA.

``sdpa_mask`` merges a key padding mask (batch, src_len; nonzero = padding), an attention mask
(tgt_len, src_len) or (batch·heads, tgt_len, src_len) (bool: True = masked; float: added to the
scores) and a causal flag into SDPA's ``attn_mask`` (bool, True = attend, or additive float) and
``is_causal``; a causal query i of the last tgt_len positions sees the keys up to its own
position (decoding with a cache: bottom-right aligned).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sdpa_mask(
    bsz: int,
    heads: int,
    tgt_len: int,
    src_len: int,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    is_causal: bool,
    q: Tensor,
) -> tuple[Optional[Tensor], bool]:
    """SDPA's ``attn_mask`` (bool, True = attend, or additive float in q's dtype) and
    ``is_causal`` for these masks."""
    if key_padding_mask is None and attn_mask is None:
        if not is_causal or tgt_len == 1:
            return None, False
        if tgt_len == src_len:
            return None, True
    keep = None  # bool, True = attend, broadcastable to (bsz, heads, tgt, src)
    if is_causal:
        keep = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device)
        keep = keep.tril(src_len - tgt_len)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(
                f"key_padding_mask must have shape (batch, src_len) = "
                f"{(bsz, src_len)}, got {tuple(key_padding_mask.shape)}"
            )
        not_pad = ~key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
        keep = not_pad if keep is None else keep & not_pad
    if attn_mask is None:
        return keep, False
    if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (tgt_len, src_len):
        attn_mask = attn_mask[None, None]
    elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (bsz * heads, tgt_len, src_len):
        attn_mask = attn_mask.view(bsz, heads, tgt_len, src_len)
    else:
        raise ValueError(
            f"attn_mask must have shape (tgt_len, src_len) = {(tgt_len, src_len)} "
            f"or (batch*heads, tgt_len, src_len), got {tuple(attn_mask.shape)}"
        )
    if attn_mask.dtype == torch.bool:
        keep = ~attn_mask if keep is None else keep & ~attn_mask
        return keep, False
    additive = attn_mask.to(q.dtype)
    if keep is not None:
        additive = additive.masked_fill(~keep, float("-inf"))
    return additive, False


def masked_scores(scores: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
    """``scores`` (…, tgt, src) with SDPA's ``attn_mask``/``is_causal`` applied as SDPA does."""
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask
