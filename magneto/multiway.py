"""Multiway layers (BEiT-3, torchscale's ``MultiwayNetwork``): per-modality per-token weights.

A multiway model (``MagnetoConfig.multiway=True``) holds two copies, ``A`` and ``B``, of every
per-token module of a layer: the norms, the packed q/k/v projection, ``out_proj``,
``inner_attn_ln`` and the feed-forward block. ``multiway_split_position`` s says which tokens
use which copy:

- ``None`` or -1 (and s equal to the length): every token uses ``A`` (vision only in BEiT-3);
- 0: every token uses ``B`` (text only);
- 0 < s < length: tokens ``[0, s)`` use ``A`` and ``[s, length)`` use ``B`` (vision + text).

A single-modality split runs the non-multiway code path with the chosen copy's parameters (no
split, no copy). A mixed split keeps the residual stream as two contiguous parts, one per
modality, from the embedding to the final norm: every fused op (``ln_linear`` with its norm
and residual add, ``add_layer_norm``) runs once per part on a contiguous tensor, with that
part's norm and weights. Only attention mixes the parts: the packed q/k/v of the two parts are
concatenated along the sequence (one copy of 3 d-vectors per token), and attention runs once
per query part over all keys, so that each part's attention output is again contiguous and
feeds its ``out_proj`` without a copy (docs/design.md, Memory accounting).

In a decoder (torchscale's ``multiway=True`` on a ``Decoder``) only the attention's
projections and ``inner_attn_ln``, self- and cross-attention, come in two copies, and since
torchscale's decoder never sets a split position, copy A serves every token (B never trains);
magneto's decoder layers pass ``part=0``.

Module names follow torchscale (``self_attn_layer_norm.A.weight``, ``ffn.B.fc1.weight``);
the packed q/k/v of a part is ``in_proj.A.weight`` (torchscale's ``q_proj.A.weight``,
``k_proj.A.weight``, ``v_proj.A.weight`` load into it and export back).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from magneto import kv_cache, masks
from magneto.attention_core import attend

PARTS = ("A", "B")


class Multiway(nn.Module):
    """Two copies of a per-token module: ``A`` for the first tokens, ``B`` for the rest."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.A, self.B = a, b

    def __getitem__(self, part: int) -> nn.Module:
        return self.B if part else self.A

    def reset_parameters(self, *args) -> None:
        """Both copies, A then B (``args``, e.g. an init gain, go to each)."""
        self.A.reset_parameters(*args)
        self.B.reset_parameters(*args)

    def forward(self, parts: Sequence[Tensor], **kwargs) -> list:
        """Each copy on its own part, ``[A(parts[0], ...), B(parts[1], ...)]``: a keyword whose
        value is a ``Multiway`` pair or a list of two parts gives each copy its own."""
        if len(parts) != 2:
            raise ValueError(f"parts must be two tensors (A part, B part), got {len(parts)}")
        return [
            copy(x, **{name: _own(value, part) for name, value in kwargs.items()})
            for part, (copy, x) in enumerate(zip((self.A, self.B), parts))
        ]


def _own(value, part: int):
    """A copy's own share of a ``Multiway.forward`` keyword."""
    return value[part] if isinstance(value, (Multiway, list, tuple)) else value


def pick(module: Optional[nn.Module], part: Optional[int]) -> Optional[nn.Module]:
    """``module[part]`` for a ``Multiway`` module, else ``module`` itself (non-multiway models
    pass ``part=None``)."""
    if isinstance(module, Multiway):
        if part is None:
            raise ValueError("a multiway module needs a part (0 = A, 1 = B)")
        return module[part]
    return module


def single_part(multiway: bool, split: Optional[int], length: int) -> Optional[int]:
    """The part every token uses (0 = A, 1 = B), None when the split is inside the sequence.

    Non-multiway models return None for ``split=None``; they refuse any split. ValueError
    names ``multiway_split_position`` when it lies outside ``[-1, length]``.
    """
    if not multiway:
        if split is not None:
            raise ValueError(
                f"multiway_split_position={split!r}: this model is not multiway "
                "(MagnetoConfig.multiway=False)"
            )
        return None
    if split is None:
        return 0
    if isinstance(split, bool) or not isinstance(split, int) or not -1 <= split <= length:
        raise ValueError(
            f"multiway_split_position must be an int in [-1, length={length}], got {split!r}"
        )
    if split in (-1, length):
        return 0
    if split == 0:
        return 1
    return None


def split_parts(x: Tensor, split: int) -> list[Tensor]:
    """``x[:, :split]`` and ``x[:, split:]`` as contiguous tensors (a copy when batch > 1: a
    sequence slice of a (batch, length, d) tensor is not a row block)."""
    return [x[:, :split].contiguous(), x[:, split:].contiguous()]


def check_parts(parts: Sequence[Tensor], embed_dim: int) -> None:
    """Two 3-D tensors with one batch size and last dimension ``embed_dim``."""
    if len(parts) != 2:
        raise ValueError(f"parts must be two tensors (A part, B part), got {len(parts)}")
    for name, t in zip(PARTS, parts):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != embed_dim:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"part {name} must be a (batch, length, embed_dim={embed_dim}) Tensor, got {shape}"
            )
    if parts[0].shape[0] != parts[1].shape[0]:
        raise ValueError(
            f"parts must share the batch size, got {tuple(parts[0].shape)} and "
            f"{tuple(parts[1].shape)}"
        )


def attention_parts(
    attn: nn.Module,
    parts: Sequence[Tensor],
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    incremental_state: Optional[dict],
    *,
    rel_pos: Optional[Tensor] = None,
    is_first_step: bool = False,
    input_norm: Optional[Multiway],
    residual: Optional[Sequence[Tensor]],
    alpha: float,
    dropout_p: float,
) -> list[Tensor]:
    """Multiway self-attention (``attn``, a ``MultiheadAttention``) over the sequence
    ``cat(parts, dim=1)``, returning the output as the same two parts: part A's tokens use copy
    A's projections and norms, part B's copy B's; attention sees every key.

    ``input_norm``/``residual``: a ``Multiway`` norm pair and the two residual parts, as in
    ``MultiheadAttention.forward``; masks, ``rel_pos``, ``is_first_step`` and
    ``incremental_state`` refer to the whole sequence.
    """
    if not attn.multiway:
        raise ValueError("parts: this attention is not multiway")
    check_parts(parts, attn.embed_dim)
    if residual is not None:
        for name, x, r in zip(PARTS, parts, residual):
            if r.shape != x.shape:
                raise ValueError(
                    f"residual part {name} must have shape {tuple(x.shape)}, got {tuple(r.shape)}"
                )
    d = attn.inner_dim
    bsz, tgt_len = parts[0].shape[0], parts[0].shape[1] + parts[1].shape[1]
    # One GEMM per part into its own output; attention needs q/k/v of the whole sequence.
    qkv = torch.cat(
        [attn._linear(x, None, pick(input_norm, part), part) for part, x in enumerate(parts)],
        dim=1,
    )
    q, k, v = (attn._heads(t) for t in qkv.split(d, dim=-1))
    k, v = kv_cache.extend(incremental_state, k, v)
    q, k = attn.rotate(q, k, incremental_state, is_first_step)
    mask, _ = masks.sdpa_mask(
        bsz, attn.num_heads, tgt_len, k.shape[2], key_padding_mask, attn_mask, False, q, rel_pos
    )
    p = attn.attention_dropout if attn.training else 0.0
    out, start = [], 0
    for part, x in enumerate(parts):
        rows = slice(start, start + x.shape[1])
        start = rows.stop
        part_mask = mask
        if mask is not None and mask.shape[-2] == tgt_len:
            part_mask = mask[..., rows, :]
        # Queries split per part: each output is (batch, part length, d) in memory order,
        # so out_proj reads it in place instead of a copy sliced from the whole output.
        y = attend(q[:, :, rows], k, v, part_mask, False, p)
        y = y.transpose(1, 2).reshape(bsz, x.shape[1], d)
        r = None if residual is None else residual[part]
        out.append(attn._out_proj(y, part, r, alpha, dropout_p))
    return out
