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

Checkpoints: parameters are stored packed, but torchscale state dicts (separate ``q_proj``,
``k_proj``, ``v_proj`` entries) load directly: a load-state-dict pre-hook packs them.
``magneto.compat.torchscale`` exports back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import magneto_kernels
from magneto.config import MagnetoConfig
from magneto.init import init_linear_, uninitialized_linear
from magneto.norm import Norm, norm_kwargs

_PACKED = ("q_proj", "k_proj", "v_proj")


class MultiheadAttention(nn.Module):
    """Self- or cross-attention over (batch, length, embed_dim) tensors.

    Parameters: ``in_proj_weight`` (3d, d) and ``in_proj_bias`` (3d) (rows q, k, v),
    ``out_proj`` (an ``nn.Linear`` used as a parameter holder), ``inner_attn_ln`` (Sub-LN
    self-attention only). ``gain``: the init gain of v_proj and out_proj (``magneto.init``).
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
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d)) if config.bias else None
        self.out_proj = uninitialized_linear(d, d, bias=config.bias)
        self.inner_attn_ln = (Norm(d, config.eps, config.norm, config.backend)
                              if config.norm_scheme == "subln" and self_attention else None)
        self.reset_parameters(gain)
        self.register_load_state_dict_pre_hook(_pack_torchscale_projections)

    def reset_parameters(self, gain: float = 1.0) -> None:
        """Init per ``config.init``: q/k gain 1, v_proj and out_proj ``gain`` (torchscale's
        draw order: k, v, q, out_proj)."""
        scheme = self.config.init
        for name, g in (("k", 1.0), ("v", gain), ("q", 1.0)):
            rows = self._rows(name)
            bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
            init_linear_(self.in_proj_weight[rows], bias, g, scheme)
        init_linear_(self.out_proj.weight, self.out_proj.bias, gain, scheme)
        if self.inner_attn_ln is not None:
            self.inner_attn_ln.reset_parameters()

    def _rows(self, name: str) -> slice:
        i = {"q": 0, "k": 1, "v": 2}[name]
        return slice(i * self.embed_dim, (i + 1) * self.embed_dim)

    def _weight(self, rows: slice) -> tuple[Tensor, Optional[Tensor]]:
        bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        return self.in_proj_weight[rows], bias

    def _linear(self, x: Tensor, rows: slice, norm: dict) -> Tensor:
        weight, bias = self._weight(rows)
        return magneto_kernels.ln_linear(x, weight=weight, bias=bias, backend=self.backend, **norm)

    def _project(self, query: Tensor, key: Tensor, value: Tensor,
                 input_norm: Optional[Norm]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of shape (batch, length, d): one GEMM when query, key and value coincide
        (self-attention), two when key and value do (cross-attention), else three."""
        d = self.embed_dim
        q_norm = norm_kwargs(input_norm)
        kv_norm = q_norm if self.self_attention else norm_kwargs(None)
        if key is query and value is query:
            return self._linear(query, slice(0, 3 * d), q_norm).split(d, dim=-1)
        q = self._linear(query, self._rows("q"), q_norm)
        if key is value:
            k, v = self._linear(key, slice(d, 3 * d), kv_norm).split(d, dim=-1)
        else:
            k = self._linear(key, self._rows("k"), kv_norm)
            v = self._linear(value, self._rows("v"), kv_norm)
        return q, k, v

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                incremental_state: Optional[dict] = None, key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, rel_pos: Optional[Tensor] = None,
                is_first_step: bool = False, *, input_norm: Optional[Norm] = None,
                residual: Optional[Tensor] = None, alpha: float = 1.0, dropout_p: float = 0.0,
                is_causal: bool = False, need_weights: bool = False
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
        - ``rel_pos`` (relative position bias) is not supported; ``is_first_step`` only matters
          for xPos, which is not supported either (accepted for torchscale's call).
        """
        key = query if key is None else key
        value = key if value is None else value
        if rel_pos is not None:
            raise ValueError("rel_pos: relative position bias is not supported")
        bsz, tgt_len = self._check_inputs(query, key, value, residual)
        q, k, v = self._project(query, key, value, input_norm)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        if incremental_state is not None:
            if "prev_key" in incremental_state:
                k = torch.cat([incremental_state["prev_key"].to(k.dtype), k], dim=2)
                v = torch.cat([incremental_state["prev_value"].to(v.dtype), v], dim=2)
            incremental_state["prev_key"], incremental_state["prev_value"] = k, v
        src_len = k.shape[2]

        mask, causal = self._attention_mask(bsz, tgt_len, src_len, key_padding_mask, attn_mask,
                                            is_causal, q)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.attention_dropout if self.training else 0.0)
        weights = self._weights(q, k, mask, causal) if need_weights else None
        attn = attn.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        out = magneto_kernels.ln_linear(
            attn, weight=self.out_proj.weight, bias=self.out_proj.bias, residual=residual,
            alpha=alpha, dropout_p=dropout_p, backend=self.backend,
            **norm_kwargs(self.inner_attn_ln))
        return out, weights

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor,
                      residual: Optional[Tensor]) -> tuple[int, int]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D Tensor (batch, length, embed_dim), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must have last dimension embed_dim={self.embed_dim}, "
                                 f"got shape {tuple(t.shape)}")
        if key.shape[0] != query.shape[0] or value.shape[:2] != key.shape[:2]:
            raise ValueError(f"query, key and value must share the batch size (and key/value the "
                             f"length), got {tuple(query.shape)}, {tuple(key.shape)}, "
                             f"{tuple(value.shape)}")
        if residual is not None and residual.shape != query.shape:
            raise ValueError(f"residual must have the query's shape {tuple(query.shape)}, got "
                             f"{tuple(residual.shape)}")
        return query.shape[0], query.shape[1]

    def _attention_mask(self, bsz: int, tgt_len: int, src_len: int,
                        key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                        is_causal: bool, q: Tensor) -> tuple[Optional[Tensor], bool]:
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
                raise ValueError(f"key_padding_mask must have shape (batch, src_len) = "
                                 f"{(bsz, src_len)}, got {tuple(key_padding_mask.shape)}")
            not_pad = ~key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
            keep = not_pad if keep is None else keep & not_pad
        if attn_mask is None:
            return keep, False
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (tgt_len, src_len):
            attn_mask = attn_mask[None, None]
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (bsz * self.num_heads, tgt_len,
                                                                 src_len):
            attn_mask = attn_mask.view(bsz, self.num_heads, tgt_len, src_len)
        else:
            raise ValueError(f"attn_mask must have shape (tgt_len, src_len) = {(tgt_len, src_len)} "
                             f"or (batch*heads, tgt_len, src_len), got {tuple(attn_mask.shape)}")
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
            scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                      else scores + mask)
        return scores.softmax(-1).to(q.dtype).transpose(0, 1)


def _pack_torchscale_projections(module: MultiheadAttention, state_dict: dict, prefix: str,
                                 *args) -> None:
    """Load-state-dict pre-hook: torchscale's ``{q,k,v}_proj.{weight,bias}`` -> packed params."""
    for kind, target in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
        keys = [f"{prefix}{name}.{kind}" for name in _PACKED]
        present = [k in state_dict for k in keys]
        if not any(present):
            continue
        if not all(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise ValueError(f"state dict has only some of {keys}; missing {missing}")
        state_dict[prefix + target] = torch.cat([state_dict.pop(k) for k in keys], dim=0)
