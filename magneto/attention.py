"""Multi-head attention with packed q/k/v, Sub-LN's inner LayerNorm and a key/value cache.

One sublayer of a Sub-LN block, with x the residual stream:

    y = alpha·x + dropout( W_O · LN_inner( SDPA( [q;k;v] = W_QKV · LN_in(x) + b_QKV ) ) + b_O )

- ``[q; k; v]`` is ONE matrix product: ``in_proj``, an ``nn.Linear`` (d -> 3d, rows q, k, v),
  run as ``ln_linear`` with the input LN; Post-LN/DeepNorm pass no input LN.
- The core is ``magneto.attention_core.attend``: ``F.scaled_dot_product_attention``'s
  semantics (masks: ``magneto.masks``; attention dropout) on the path measured fastest for the
  device, dtype and shape (torch's SDPA kernels, or two GEMMs around a softmax).
- ``out_proj`` is ``ln_linear`` with the inner LN (Sub-LN only; self-attention only), the
  residual, alpha and the output dropout in its epilogue.

Cross-attention (``self_attention=False``): q from the (normalised) decoder stream, k/v from the
encoder output through plain projections (rows of ``in_proj``), no inner LN.

Positions inside attention (torchscale's options, ``magneto.config``): a relative position bias
(``rel_pos``) is added to the scores inside SDPA's mask (``masks.sdpa_mask``); xPos
(``config.xpos_rel_pos``, self-attention only) rotates q and k after the cache is extended, so
the cache keeps unrotated keys, as torchscale's (``magneto.xpos``).

Decoding caches (``incremental_state``, ``static_kv_cache``): ``magneto.kv_cache``; an
unmasked step over a cache the caller hands in (torchscale's format, a new tensor pair each
step) attends while copying it into its room (``kv_cache.attend_handed_in``). Multiway
(``config.multiway``): ``in_proj``, ``out_proj`` and ``inner_attn_ln`` come in two copies
``A``/``B`` (``magneto.multiway``); ``part`` picks the copy every token uses, and a query given
as two parts (self-attention) runs ``multiway.attention_parts``.

A projection or norm magneto cannot fuse (a LoRA layer, hooks, a quantised module) is called as
a module instead (``magneto.fusion``). q, k and v are one module, ``in_proj``: an adapter or a
hook on it covers all three.

Checkpoints: torchscale state dicts (separate ``q_proj``, ``k_proj``, ``v_proj`` entries, per
part ``q_proj.A`` ... for multiway) load directly: a load-state-dict pre-hook packs them (and
renames the ``in_proj_weight``/``in_proj_bias`` of earlier magneto versions; xPos's constant
``xpos.scale`` buffer is checked and dropped).
``magneto.compat.torchscale`` exports back.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from magneto import kv_cache, masks
from magneto.attention_core import attend
from magneto.config import MagnetoConfig
from magneto.fusion import project
from magneto.init import init_linear_, uninitialized_linear
from magneto.multiway import PARTS, Multiway, attention_parts, pick
from magneto.norm import NormLayer
from magneto.xpos import apply_xpos_qk, xpos_scale

_PACKED = ("q_proj", "k_proj", "v_proj")


class MultiheadAttention(nn.Module):
    """Self- or cross-attention over (batch, length, embed_dim) tensors.

    Submodules: ``in_proj`` (``nn.Linear`` (3d, d), rows q, k, v), ``out_proj`` (``nn.Linear``),
    ``inner_attn_ln`` (Sub-LN self-attention only); in a multiway model each is a ``Multiway``
    pair. ``gain``: the init gain of v_proj and out_proj (``magneto.init``).
    """

    def __init__(self, config: MagnetoConfig, self_attention: bool = True, gain: float = 1.0):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = d, config.num_heads, config.head_dim
        # the width of q, k, v and of the attention output, num_heads·head_dim: embed_dim, or
        # this rank's heads only under tensor parallelism (magneto.parallel)
        self.inner_dim = d
        self.self_attention = self_attention
        self.encoder_decoder_attention = not self_attention
        self.attention_dropout = config.attention_dropout
        self.backend = config.backend
        self.multiway = config.multiway
        # xPos rotates self-attention only (torchscale's ``xpos``)
        self.xpos_scale_base = (
            config.xpos_scale_base if config.xpos_rel_pos and self_attention else None
        )

        def copies(build):
            return Multiway(build(), build()) if self.multiway else build()

        self.in_proj = copies(lambda: uninitialized_linear(d, 3 * d, bias=config.bias))
        self.out_proj = copies(lambda: uninitialized_linear(d, d, bias=config.bias))
        self.inner_attn_ln = (
            copies(lambda: NormLayer(d, config.eps, config.norm, config.backend))
            if config.norm_scheme == "subln" and self_attention
            else None
        )
        self.parts = (0, 1) if self.multiway else (None,)
        self.reset_parameters(gain)
        self.register_load_state_dict_pre_hook(_pack_torchscale_projections)

    @property
    def in_proj_weight(self) -> Tensor:
        """The packed q/k/v weight, ``in_proj.weight`` (``torch.nn.MultiheadAttention``'s name)."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        """The packed q/k/v bias, ``in_proj.bias``."""
        return self.in_proj.bias

    def reset_parameters(self, gain: float = 1.0) -> None:
        """Init per ``config.init``: q/k gain 1, v_proj and out_proj ``gain`` (torchscale's
        draw order: k, v, q, out_proj; multiway: A then B of each)."""
        scheme = self.config.init
        for name, g in (("k", 1.0), ("v", gain), ("q", 1.0)):
            rows = self._rows(name)
            for part in self.parts:
                in_proj = pick(self.in_proj, part)
                bias = None if in_proj.bias is None else in_proj.bias[rows]
                init_linear_(in_proj.weight[rows], bias, g, scheme)
        for part in self.parts:
            out_proj = pick(self.out_proj, part)
            init_linear_(out_proj.weight, out_proj.bias, gain, scheme)
        if self.inner_attn_ln is not None:
            self.inner_attn_ln.reset_parameters()

    def _rows(self, name: str) -> slice:
        """The rows of q, k or v ("q", "k", "v"; "kv": k and v) in ``in_proj``'s output."""
        start, stop = {"q": (0, 1), "k": (1, 2), "v": (2, 3), "kv": (1, 3)}[name]
        return slice(start * self.inner_dim, stop * self.inner_dim)

    def _linear(
        self, x: Tensor, rows: Optional[slice], norm: Optional[nn.Module], part: Optional[int]
    ) -> Tensor:
        """``in_proj(norm(x))``, the rows ``rows`` of it (None: all of q, k, v)."""
        in_proj = pick(self.in_proj, part)
        site = "MultiheadAttention.in_proj"
        return project(site, x, in_proj, norm, rows=rows, backend=self.backend)

    def _out_proj(
        self,
        attn: Tensor,
        part: Optional[int],
        residual: Optional[Tensor],
        alpha: float,
        dropout_p: float,
    ) -> Tensor:
        """``alpha·residual + dropout(out_proj(inner_attn_ln(attn)))``, one fused op."""
        return project(
            "MultiheadAttention.out_proj",
            attn,
            pick(self.out_proj, part),
            pick(self.inner_attn_ln, part),
            residual=residual,
            alpha=alpha,
            dropout_p=dropout_p,
            backend=self.backend,
        )

    def _project(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        input_norm: Optional[nn.Module],
        part: Optional[int],
        kv_cached: bool = False,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """q, k, v of shape (batch, length, d): one GEMM when query, key and value coincide
        (self-attention), two when key and value do (cross-attention), else three; q alone
        (k, v None) when ``kv_cached``."""
        d = self.inner_dim
        kv_norm = input_norm if self.self_attention else None
        if key is query and value is query and not kv_cached:
            return self._linear(query, None, input_norm, part).split(d, dim=-1)
        q = self._linear(query, self._rows("q"), input_norm, part)
        if kv_cached:
            return q, None, None
        if key is value:
            k, v = self._linear(key, self._rows("kv"), kv_norm, part).split(d, dim=-1)
        else:
            k = self._linear(key, self._rows("k"), kv_norm, part)
            v = self._linear(value, self._rows("v"), kv_norm, part)
        return q, k, v

    def _heads(self, t: Tensor) -> Tensor:
        """(batch, length, d) -> (batch, heads, length, head_dim), a view."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        query,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        rel_pos: Optional[Tensor] = None,
        is_first_step: bool = False,
        *,
        input_norm: Optional[nn.Module] = None,
        residual=None,
        alpha: float = 1.0,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        need_weights: bool = False,
        part: Optional[int] = None,
        static_kv_cache: Optional[dict] = None,
    ) -> tuple:
        """torchscale's call: returns ``(output, attention weights or None)``.

        - ``query``: (batch, tgt_len, d); or, in a multiway model, a sequence held as two parts
          (then ``residual`` too, ``input_norm`` a ``Multiway`` pair, and the output the two
          parts; ``multiway.attention_parts``).
        - ``key_padding_mask``: (batch, src_len); ``attn_mask``: (tgt_len, src_len) or
          (batch·heads, tgt_len, src_len). Each is read by its dtype (``magneto.masks``): bool
          True = masked, floating = added to the scores, integer = torchscale's 0/1 (nonzero =
          masked). A float key padding mask is a bias, as in ``torch.nn``; torchscale's
          ``MultiheadAttention`` reads any padding mask as nonzero = padding, which magneto's
          layers and models do for it (``masks.torchscale_mask``).
        - ``incremental_state``: a dict; ``prev_key``/``prev_value`` (batch, heads, len,
          head_dim) are read and extended (self-attention decoding, torchscale's format).
        - ``is_causal``: query i (of the last tgt_len positions) sees keys up to its own position.
        - ``input_norm``: norm applied to the query (and, in self-attention, to key and value)
          inside the projection (fused). ``residual``/``alpha``/``dropout_p``: the output is
          ``alpha·residual + dropout(out_proj(...))``, all in ``out_proj``'s epilogue.
        - ``need_weights``: also return the softmax probabilities (heads, batch, tgt, src) as
          torchscale does (computed separately; SDPA does not expose them). Default: None.
        - ``part``: multiway models, the copy every token uses (0 = A, 1 = B); None in
          non-multiway models.
        - ``static_kv_cache``: cross-attention decoding, a dict (empty at the first step) that
          keeps k and v of ``key``/``value`` between calls: while the same key and value tensors
          are passed (the encoder output of every decoding step), their projections are reused
          instead of recomputed. torchscale recomputes them at every step.
        - ``rel_pos``: a bias added to the scores after the masks, torchscale's (batch·heads,
          tgt_len, src_len) or anything 4-D that broadcasts to (batch, heads, tgt_len, src_len)
          (``magneto.relative_position``).
        - ``is_first_step``: with xPos and an ``incremental_state``, the queries sit at the
          positions from 0 (the first, prefilling call) instead of at the cache's last position.
        """
        if isinstance(query, (list, tuple)):
            parts = attention_parts(
                self,
                query,
                key_padding_mask,
                attn_mask,
                incremental_state,
                rel_pos=rel_pos,
                is_first_step=is_first_step,
                input_norm=input_norm,
                residual=residual,
                alpha=alpha,
                dropout_p=dropout_p,
            )
            return parts, None
        key = query if key is None else key
        value = key if value is None else value
        bsz, tgt_len = self._check_inputs(query, key, value, residual)
        if self.multiway and part is None:
            raise ValueError("part: a multiway attention needs the copy to use (0 = A, 1 = B)")
        cached = kv_cache.cached_encoder_kv(static_kv_cache, key, value)
        q, k, v = self._project(query, key, value, input_norm, part, cached is not None)
        if cached is None:
            k, v = self._heads(k), self._heads(v)
            kv_cache.keep_encoder_kv(static_kv_cache, key, value, k, v)
        else:
            k, v = cached
        q = self._heads(q)
        dropout = self.attention_dropout if self.training else 0.0
        attn = None
        unmasked = key_padding_mask is None and attn_mask is None and rel_pos is None
        if unmasked and not is_causal and self.xpos_scale_base is None and not dropout:
            attn = kv_cache.attend_handed_in(incremental_state, q, k, v)
        if attn is None:
            k, v = kv_cache.extend(incremental_state, k, v)
            q, k = self.rotate(q, k, incremental_state, is_first_step)
            mask, causal = masks.sdpa_mask(
                bsz,
                self.num_heads,
                tgt_len,
                k.shape[2],
                key_padding_mask,
                attn_mask,
                is_causal,
                q,
                rel_pos,
            )
            attn = attend(q, k, v, mask, causal, dropout)
        else:  # an unmasked step over a handed-in cache, attended while copying it
            k, v = incremental_state["prev_key"], incremental_state["prev_value"]
            mask, causal = None, False
        weights = self._weights(q, k, mask, causal) if need_weights else None
        attn = attn.transpose(1, 2).reshape(bsz, tgt_len, self.inner_dim)
        return self._out_proj(attn, part, residual, alpha, dropout_p), weights

    def rotate(
        self, q: Tensor, k: Tensor, incremental_state: Optional[dict], is_first_step: bool
    ) -> tuple[Tensor, Tensor]:
        """q and k (heads layout, k the whole cache) with xPos applied as torchscale applies it:
        a decoding call after the first puts its queries at the cache's last position,
        ``src_len − 1`` (torchscale's offset, whatever the number of queries); unchanged
        without xPos."""
        if self.xpos_scale_base is None:
            return q, k
        decoding = incremental_state is not None and not is_first_step
        offset = k.shape[2] - 1 if decoding else 0
        return apply_xpos_qk(q, k, offset, scale_base=self.xpos_scale_base)

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

    def _weights(self, q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """Softmax probabilities (heads, batch, tgt, src), before attention dropout."""
        dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in >= fp32 (torchscale)
        scores = (q @ k.transpose(-1, -2)).to(dtype) / math.sqrt(self.head_dim)
        scores = masks.masked_scores(scores, mask, causal)
        return scores.softmax(-1).to(q.dtype).transpose(0, 1)


def _pack_torchscale_projections(
    module: MultiheadAttention, state_dict: dict, prefix: str, *args
) -> None:
    """Load-state-dict pre-hook: torchscale's ``{q,k,v}_proj.{weight,bias}`` -> ``in_proj``
    (multiway: ``{q,k,v}_proj.A.weight`` -> ``in_proj.A.weight``, likewise for B), and the
    ``in_proj_weight``/``in_proj_bias`` of earlier magneto versions -> ``in_proj``; with xPos,
    torchscale's ``xpos.scale`` buffer (constant: ``xpos_scale(head_dim)``) is checked and
    dropped."""
    scale = state_dict.get(f"{prefix}xpos.scale")
    if scale is not None and module.xpos_scale_base is not None:
        expected = xpos_scale(module.head_dim).to(scale.dtype)
        if not torch.equal(scale.cpu(), expected):
            raise ValueError(
                f"{prefix}xpos.scale is not xPos's scale for head_dim={module.head_dim}"
            )
        del state_dict[f"{prefix}xpos.scale"]
    for kind in ("weight", "bias"):
        if f"{prefix}in_proj_{kind}" in state_dict:
            state_dict[f"{prefix}in_proj.{kind}"] = state_dict.pop(f"{prefix}in_proj_{kind}")
    parts = [f".{part}" for part in PARTS] if module.multiway else [""]
    for part in parts:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}{part}.{kind}" for name in _PACKED]
            present = [k in state_dict for k in keys]
            if not any(present):
                continue
            if not all(present):
                missing = [k for k, p in zip(keys, present) if not p]
                raise ValueError(f"state dict has only some of {keys}; missing {missing}")
            packed = torch.cat([state_dict.pop(k) for k in keys], dim=0)
            state_dict[f"{prefix}in_proj{part}.{kind}"] = packed
