"""Multi-head attention with packed q/k/v, Sub-LN's inner LayerNorm and a key/value cache.

One sublayer of a Sub-LN block, with x the residual stream:

    y = alpha·x + dropout( W_O · LN_inner( SDPA( [q;k;v] = W_QKV · LN_in(x) + b_QKV ) ) + b_O )

- ``[q; k; v]`` is ONE matrix product (``ln_linear`` with the input LN and the packed weight
  ``in_proj_weight`` of shape (3d, d), rows q, k, v); Post-LN/DeepNorm pass no input LN.
- The core is ``F.scaled_dot_product_attention`` (key-padding mask, causal mask, attention
  dropout; FlashAttention / memory-efficient kernels on GPU when no explicit mask is needed).
- ``out_proj`` is ``ln_linear`` with the inner LN (Sub-LN only; self-attention only), the
  residual, alpha and the output dropout in its epilogue.

Cross-attention (``self_attention=False``): q from the (normalised) decoder stream, k/v from the
encoder output through plain projections, no inner LN.

Multiway (``config.multiway``, self-attention only): ``in_proj``, ``out_proj`` and
``inner_attn_ln`` come in two copies ``A``/``B`` (``magneto.multiway``); ``part`` picks the
copy every token uses, ``forward_parts`` runs a sequence made of an A part and a B part.

Checkpoints: parameters are stored packed, but torchscale state dicts (separate ``q_proj``,
``k_proj``, ``v_proj`` entries, per part ``q_proj.A`` ... for multiway) load directly: a
load-state-dict pre-hook packs them. ``magneto.compat.torchscale`` exports back.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

import magneto_kernels
from magneto.config import MagnetoConfig
from magneto.init import init_linear_, uninitialized_linear
from magneto.multiway import PARTS, Multiway, check_parts, pick
from magneto.norm import Norm, norm_kwargs

_PACKED = ("q_proj", "k_proj", "v_proj")


class _KVRoom:
    """Cached keys and values with room to grow, so that a decoding step writes only its new
    positions instead of copying the whole cache (torch.cat: O(length) per step, O(length²) per
    sequence; at 8 rows over 256 cached tokens the copy took half of a decoder layer's step).

    ``prev_key``/``prev_value`` are views of the first ``length`` positions of two buffers of
    ``capacity`` positions (``_ROOMS`` maps the views to their room, weakly; a deep copy or a
    saved state holds plain tensors). A step extends in place only if the cache it is given is the
    room's latest pair of views and the new positions fit; anything else (a caller's tensors,
    torchscale's reordered copies, an older view shared by a copied dict, another dtype, a full
    room) starts a new room, copying what it is given, with half as much room again. Positions
    a view covers are never written again, so earlier views keep their values.
    """

    def __init__(self, prev_k: Optional[Tensor], prev_v: Optional[Tensor], k: Tensor, v: Tensor):
        need = k.shape[2] + (0 if prev_k is None else prev_k.shape[2])
        capacity = need + max(16, need // 2)
        self.key = k.new_empty((*k.shape[:2], capacity, k.shape[3]))
        self.value = v.new_empty((*v.shape[:2], capacity, v.shape[3]))
        self.length = 0
        if prev_k is not None:
            self._write(prev_k, prev_v)

    def _write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start, self.length = self.length, self.length + k.shape[2]
        self.key[:, :, start : self.length].copy_(k)
        self.value[:, :, start : self.length].copy_(v)
        views = self.key[:, :, : self.length], self.value[:, :, : self.length]
        for view in views:
            _ROOMS[view] = self
        return views

    def _takes(self, prev_k: Tensor, prev_v: Tensor, k: Tensor, v: Tensor) -> bool:
        """Whether (prev_k, prev_v) are this room's latest views and k, v fit after them."""
        return (
            _ROOMS.get(prev_v) is self
            and prev_k.shape[2] == self.length == prev_v.shape[2]
            and self.length + k.shape[2] <= self.key.shape[2]
            and k.shape[:2] == self.key.shape[:2]
            and k.shape[3] == self.key.shape[3]
            and v.shape[:2] == self.value.shape[:2]
            and v.shape[3] == self.value.shape[3]
            and k.dtype == self.key.dtype
            and v.dtype == self.value.dtype
            and k.device == self.key.device
            # buffers made under inference_mode take in-place writes only inside it
            and (not self.key.is_inference() or torch.is_inference_mode_enabled())
        )

    @classmethod
    def extend(
        cls, prev_k: Optional[Tensor], prev_v: Optional[Tensor], k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The cache (prev_k, prev_v) followed by (k, v) along the positions, as views."""
        room = None if prev_k is None else _ROOMS.get(prev_k)
        if room is None or not room._takes(prev_k, prev_v, k, v):
            room = cls(prev_k, prev_v, k, v)
        return room._write(k, v)


_ROOMS = WeakIdKeyDictionary()  # cache view -> its _KVRoom, while the view lives


class MultiheadAttention(nn.Module):
    """Self- or cross-attention over (batch, length, embed_dim) tensors.

    Parameters: ``in_proj_weight`` (3d, d) and ``in_proj_bias`` (3d) (rows q, k, v),
    ``out_proj`` (an ``nn.Linear`` used as a parameter holder), ``inner_attn_ln`` (Sub-LN
    self-attention only). Multiway: ``in_proj.A``/``in_proj.B`` (``nn.Linear`` (3d, d) holders)
    instead of ``in_proj_weight``/``in_proj_bias``, and ``out_proj``/``inner_attn_ln`` are
    ``Multiway`` pairs. ``gain``: the init gain of v_proj and out_proj (``magneto.init``).
    """

    def __init__(self, config: MagnetoConfig, self_attention: bool = True, gain: float = 1.0):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = d, config.num_heads, config.head_dim
        self.self_attention = self_attention
        self.encoder_decoder_attention = not self_attention
        self.attention_dropout = config.attention_dropout
        self.backend = config.backend
        self.multiway = config.multiway
        if self.multiway and not self_attention:
            raise ValueError("multiway: only self-attention can be multiway")

        def copies(build):
            return Multiway(build(), build()) if self.multiway else build()

        if self.multiway:
            self.in_proj = copies(lambda: uninitialized_linear(d, 3 * d, bias=config.bias))
        else:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
            self.in_proj_bias = nn.Parameter(torch.empty(3 * d)) if config.bias else None
        self.out_proj = copies(lambda: uninitialized_linear(d, d, bias=config.bias))
        self.inner_attn_ln = (
            copies(lambda: Norm(d, config.eps, config.norm, config.backend))
            if config.norm_scheme == "subln" and self_attention
            else None
        )
        self.parts = (0, 1) if self.multiway else (None,)
        self.reset_parameters(gain)
        self.register_load_state_dict_pre_hook(_pack_torchscale_projections)

    def reset_parameters(self, gain: float = 1.0) -> None:
        """Init per ``config.init``: q/k gain 1, v_proj and out_proj ``gain`` (torchscale's
        draw order: k, v, q, out_proj; multiway: A then B of each)."""
        scheme = self.config.init
        for name, g in (("k", 1.0), ("v", gain), ("q", 1.0)):
            rows = self._rows(name)
            for part in self.parts:
                weight, bias = self._weight(rows, part)
                init_linear_(weight, bias, g, scheme)
        for part in self.parts:
            out_proj = pick(self.out_proj, part)
            init_linear_(out_proj.weight, out_proj.bias, gain, scheme)
        if self.inner_attn_ln is not None:
            self.inner_attn_ln.reset_parameters()

    def _rows(self, name: str) -> slice:
        i = {"q": 0, "k": 1, "v": 2}[name]
        return slice(i * self.embed_dim, (i + 1) * self.embed_dim)

    def _weight(self, rows: slice, part: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
        """Rows of the packed q/k/v weight and bias (of copy ``part`` in a multiway model)."""
        if self.multiway:
            proj = pick(self.in_proj, part)
            weight, bias = proj.weight, proj.bias
        else:
            weight, bias = self.in_proj_weight, self.in_proj_bias
        if rows.start == 0 and rows.stop == weight.shape[0]:  # all of q/k/v: no slice views
            return weight, bias
        return weight[rows], None if bias is None else bias[rows]

    def _linear(self, x: Tensor, rows: slice, norm: dict, part: Optional[int]) -> Tensor:
        weight, bias = self._weight(rows, part)
        return magneto_kernels.ln_linear(x, weight=weight, bias=bias, backend=self.backend, **norm)

    def _out_proj(
        self,
        attn: Tensor,
        part: Optional[int],
        residual: Optional[Tensor],
        alpha: float,
        dropout_p: float,
    ) -> Tensor:
        """``alpha·residual + dropout(out_proj(inner_attn_ln(attn)))``, one fused op."""
        out_proj = pick(self.out_proj, part)
        return magneto_kernels.ln_linear(
            attn,
            weight=out_proj.weight,
            bias=out_proj.bias,
            residual=residual,
            alpha=alpha,
            dropout_p=dropout_p,
            backend=self.backend,
            **norm_kwargs(pick(self.inner_attn_ln, part)),
        )

    def _project(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        input_norm: Optional[Norm],
        part: Optional[int],
        kv_cached: bool = False,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """q, k, v of shape (batch, length, d): one GEMM when query, key and value coincide
        (self-attention), two when key and value do (cross-attention), else three; q alone
        (k, v None) when ``kv_cached``."""
        d = self.embed_dim
        q_norm = norm_kwargs(input_norm)
        kv_norm = q_norm if self.self_attention else norm_kwargs(None)
        if key is query and value is query and not kv_cached:
            return self._linear(query, slice(0, 3 * d), q_norm, part).split(d, dim=-1)
        q = self._linear(query, self._rows("q"), q_norm, part)
        if kv_cached:
            return q, None, None
        if key is value:
            k, v = self._linear(key, slice(d, 3 * d), kv_norm, part).split(d, dim=-1)
        else:
            k = self._linear(key, self._rows("k"), kv_norm, part)
            v = self._linear(value, self._rows("v"), kv_norm, part)
        return q, k, v

    def _heads(self, t: Tensor) -> Tensor:
        """(batch, length, d) -> (batch, heads, length, head_dim), a view."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _static_kv(
        self, static_kv_cache: dict, query: Tensor, key: Tensor, value: Tensor, input_norm, part
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v in heads layout, k and v from ``static_kv_cache`` while it holds them for these
        key and value tensors, else projected and stored there."""
        hit = (
            static_kv_cache.get("key_source") is key
            and static_kv_cache.get("value_source") is value
        )
        q, k, v = self._project(query, key, value, input_norm, part, kv_cached=hit)
        if hit:
            return self._heads(q), static_kv_cache["key"], static_kv_cache["value"]
        k, v = self._heads(k), self._heads(v)
        static_kv_cache.update(key_source=key, value_source=value, key=k, value=v)
        return self._heads(q), k, v

    @staticmethod
    def _extend_cache(
        incremental_state: Optional[dict], k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        if incremental_state is None:
            return k, v
        prev_k, prev_v = incremental_state.get("prev_key"), incremental_state.get("prev_value")
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (k, v, prev_k, prev_v))
        ):
            # Traced or differentiated: torchscale's copy, no in-place writes.
            if prev_k is not None:
                k = torch.cat([prev_k.to(k.dtype), k], dim=2)
                v = torch.cat([prev_v.to(v.dtype), v], dim=2)
        else:
            k, v = _KVRoom.extend(prev_k, prev_v, k, v)
        incremental_state["prev_key"], incremental_state["prev_value"] = k, v
        return k, v

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        rel_pos: Optional[Tensor] = None,
        is_first_step: bool = False,
        *,
        input_norm: Optional[Norm] = None,
        residual: Optional[Tensor] = None,
        alpha: float = 1.0,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        need_weights: bool = False,
        part: Optional[int] = None,
        static_kv_cache: Optional[dict] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """torchscale's call: returns ``(output, attention weights or None)``.

        - ``key_padding_mask``: (batch, src_len), True/nonzero marks padding (ignored keys).
        - ``attn_mask``: (tgt_len, src_len) or (batch·heads, tgt_len, src_len); float masks are
          added to the scores (torchscale), bool masks mark masked positions with True.
        - ``incremental_state``: a dict; ``prev_key``/``prev_value`` (batch, heads, len,
          head_dim) are read and extended (self-attention decoding, torchscale's format).
        - ``is_causal``: query i (of the last tgt_len positions) sees keys up to its own position.
        - ``input_norm``: norm applied to the query (and, in self-attention, to key and value)
          inside the projection (fused). ``residual``/``alpha``/``dropout_p``: the output is
          ``alpha·residual + dropout(out_proj(...))``, all in ``out_proj``'s epilogue.
        - ``need_weights``: also return the softmax probabilities (heads, batch, tgt, src) as
          torchscale does (computed separately; SDPA does not expose them). Default: None.
        - ``part``: multiway models, the copy every token uses (0 = A, 1 = B; ``forward_parts``
          mixes them); None in non-multiway models.
        - ``static_kv_cache``: cross-attention decoding, a dict (empty at the first step) that
          keeps k and v of ``key``/``value`` between calls: while the same key and value tensors
          are passed (the encoder output of every decoding step), their projections are reused
          instead of recomputed. torchscale recomputes them at every step.
        - ``rel_pos`` (relative position bias) is not supported; ``is_first_step`` only matters
          for xPos, which is not supported either (accepted for torchscale's call).
        """
        key = query if key is None else key
        value = key if value is None else value
        if rel_pos is not None:
            raise ValueError("rel_pos: relative position bias is not supported")
        bsz, tgt_len = self._check_inputs(query, key, value, residual)
        if self.multiway and part is None:
            raise ValueError("part: a multiway attention needs the copy to use (0 = A, 1 = B)")
        if static_kv_cache is not None:
            q, k, v = self._static_kv(static_kv_cache, query, key, value, input_norm, part)
        else:
            q, k, v = (self._heads(t) for t in self._project(query, key, value, input_norm, part))
        k, v = self._extend_cache(incremental_state, k, v)
        src_len = k.shape[2]

        mask, causal = self._attention_mask(
            bsz, tgt_len, src_len, key_padding_mask, attn_mask, is_causal, q
        )
        attn = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        weights = self._weights(q, k, mask, causal) if need_weights else None
        attn = attn.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        return self._out_proj(attn, part, residual, alpha, dropout_p), weights

    def forward_parts(
        self,
        parts: Sequence[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
        *,
        input_norm: Optional[Multiway] = None,
        residual: Optional[Sequence[Tensor]] = None,
        alpha: float = 1.0,
        dropout_p: float = 0.0,
    ) -> list[Tensor]:
        """Multiway self-attention over the sequence ``cat(parts, dim=1)``, returning the output
        as the same two parts: part A's tokens use copy A's projections and norms, part B's
        copy B's; attention sees every key.

        ``input_norm``/``residual``: a ``Multiway`` norm pair and the two residual parts, as in
        ``forward``; masks and ``incremental_state`` refer to the whole sequence.
        """
        if not self.multiway:
            raise ValueError("forward_parts: this attention is not multiway")
        check_parts(parts, self.embed_dim)
        if residual is not None:
            for name, x, r in zip(PARTS, parts, residual):
                if r.shape != x.shape:
                    raise ValueError(
                        f"residual part {name} must have shape {tuple(x.shape)}, "
                        f"got {tuple(r.shape)}"
                    )
        d = self.embed_dim
        bsz, tgt_len = parts[0].shape[0], parts[0].shape[1] + parts[1].shape[1]
        # One GEMM per part into its own output; attention needs q/k/v of the whole sequence.
        qkv = torch.cat(
            [
                self._linear(x, slice(0, 3 * d), norm_kwargs(pick(input_norm, part)), part)
                for part, x in enumerate(parts)
            ],
            dim=1,
        )
        q, k, v = (self._heads(t) for t in qkv.split(d, dim=-1))
        k, v = self._extend_cache(incremental_state, k, v)
        mask, _ = self._attention_mask(
            bsz, tgt_len, k.shape[2], key_padding_mask, attn_mask, False, q
        )
        p = self.attention_dropout if self.training else 0.0
        out, start = [], 0
        for part, x in enumerate(parts):
            rows = slice(start, start + x.shape[1])
            start = rows.stop
            part_mask = mask
            if mask is not None and mask.shape[-2] == tgt_len:
                part_mask = mask[..., rows, :]
            # Queries split per part: each output is (batch, part length, d) in memory order,
            # so out_proj reads it in place instead of a copy sliced from the whole output.
            attn = F.scaled_dot_product_attention(
                q[:, :, rows], k, v, attn_mask=part_mask, dropout_p=p
            )
            attn = attn.transpose(1, 2).reshape(bsz, x.shape[1], d)
            out.append(
                self._out_proj(
                    attn, part, None if residual is None else residual[part], alpha, dropout_p
                )
            )
        return out

    def _check_inputs(
        self, query: Tensor, key: Tensor, value: Tensor, residual: Optional[Tensor]
    ) -> tuple[int, int]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise ValueError(
                    f"{name} must be a 3-D Tensor (batch, length, embed_dim), got "
                    f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
                )
            if t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must have last dimension embed_dim={self.embed_dim}, "
                    f"got shape {tuple(t.shape)}"
                )
        if key.shape[0] != query.shape[0] or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"query, key and value must share the batch size (and key/value the "
                f"length), got {tuple(query.shape)}, {tuple(key.shape)}, "
                f"{tuple(value.shape)}"
            )
        if residual is not None and residual.shape != query.shape:
            raise ValueError(
                f"residual must have the query's shape {tuple(query.shape)}, got "
                f"{tuple(residual.shape)}"
            )
        return query.shape[0], query.shape[1]

    def _attention_mask(
        self,
        bsz: int,
        tgt_len: int,
        src_len: int,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
        is_causal: bool,
        q: Tensor,
    ) -> tuple[Optional[Tensor], bool]:
        """SDPA's ``attn_mask`` (bool: True = attend, or additive float) and ``is_causal``."""
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
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (
            bsz * self.num_heads,
            tgt_len,
            src_len,
        ):
            attn_mask = attn_mask.view(bsz, self.num_heads, tgt_len, src_len)
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

    def _weights(self, q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """Softmax probabilities (heads, batch, tgt, src), before attention dropout."""
        dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in >= fp32 (torchscale)
        scores = (q @ k.transpose(-1, -2)).to(dtype) / math.sqrt(self.head_dim)
        if causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask
            )
        return scores.softmax(-1).to(q.dtype).transpose(0, 1)


def _pack_torchscale_projections(
    module: MultiheadAttention, state_dict: dict, prefix: str, *args
) -> None:
    """Load-state-dict pre-hook: torchscale's ``{q,k,v}_proj.{weight,bias}`` -> packed params
    (multiway: ``{q,k,v}_proj.A.weight`` -> ``in_proj.A.weight``, likewise for B)."""
    if module.multiway:
        targets = [
            (f".{part}.{kind}", f"in_proj.{part}.{kind}")
            for part in PARTS
            for kind in ("weight", "bias")
        ]
    else:
        targets = [(".weight", "in_proj_weight"), (".bias", "in_proj_bias")]
    for suffix, target in targets:
        keys = [f"{prefix}{name}{suffix}" for name in _PACKED]
        present = [k in state_dict for k in keys]
        if not any(present):
            continue
        if not all(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise ValueError(f"state dict has only some of {keys}; missing {missing}")
        state_dict[prefix + target] = torch.cat([state_dict.pop(k) for k in keys], dim=0)
