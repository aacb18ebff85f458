"""Encoder and decoder layers: residual blocks around attention and feed-forward sublayers.

One residual block, per ``config.norm_scheme`` (x the residual stream, f a sublayer, p the
output dropout, alpha from ``magneto.init.layer_scales``):

- subln / pre: ``x <- alpha·x + dropout(f(LN(x)))``. The input LN is fused into f's first
  projection and the add into its last (``ln_linear(..., residual=x, alpha=alpha)``).
- post / deepnorm: ``x <- LN(alpha·x + dropout(f(x)))`` with ``add_layer_norm``.

With drop path active (training, rate > 0) the add is unfused: f runs without ``residual``,
its output is scaled per sample, then added (Post-LN/DeepNorm: then ``add_layer_norm``).

Multiway encoder layers (``config.multiway``; ``magneto.multiway``): the norms and ``ffn`` are
``Multiway`` pairs. A single-modality ``multiway_split_position`` runs the block above with one
copy; ``forward_parts`` runs the same block once per part (each fused op on a contiguous
part, with that part's norm and weights), attention over the whole sequence.

Parameter names follow torchscale (``self_attn``, ``self_attn_layer_norm``, ``encoder_attn``,
``encoder_attn_layer_norm``, ``ffn``, ``final_layer_norm``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

import magneto_kernels
from magneto.attention import MultiheadAttention
from magneto.config import MagnetoConfig
from magneto.feedforward import FeedForward
from magneto.init import layer_scales
from magneto.multiway import Multiway, check_parts, pick, single_part, split_parts
from magneto.norm import Norm


class DropPath(nn.Module):
    """Stochastic depth: each sample's branch is zeroed with probability p, else scaled 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self.sample(x) / (1.0 - self.p)

    def sample(self, x: Tensor) -> Tensor:
        """The per-sample keep mask, (batch, 1, ..., 1): one draw for a whole sample, shared
        by the parts of a multiway sequence."""
        return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rate(config: MagnetoConfig, depth: int, num_layers: int) -> float:
    """Layer ``depth``'s rate: linear from 0 (first layer) to ``config.drop_path`` (last)."""
    if num_layers <= 1:
        return 0.0
    return config.drop_path * depth / (num_layers - 1)


class ResidualLayer(nn.Module):
    """What encoder and decoder layers share: the residual block and its scales."""

    def __init__(self, config: MagnetoConfig, role: str, depth: int, is_encoder_decoder: bool):
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.normalize_before = config.normalize_before
        self.scales = layer_scales(config, role, is_encoder_decoder)
        self.alpha = self.scales.alpha
        num_layers = config.encoder_layers if role == "encoder" else config.decoder_layers
        rate = drop_path_rate(config, depth, num_layers)
        self.drop_path = DropPath(rate) if rate > 0.0 else None

    def _norm(self) -> nn.Module:
        """The layer's norm: a ``Multiway`` pair in a multiway model."""
        c = self.config

        def build():
            return Norm(c.embed_dim, c.eps, c.norm, c.backend)

        return Multiway(build(), build()) if c.multiway else build()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must be a (batch, length, embed_dim={self.embed_dim}) Tensor, got {shape}"
            )

    def residual_block(self, x: Tensor, norm: Norm, sublayer: Callable[..., Tensor]) -> Tensor:
        """The new residual stream after ``sublayer`` (called with the fused-op keywords)."""
        p = self.config.dropout if self.training else 0.0
        drop_path = self.drop_path is not None and self.training
        if self.normalize_before:
            if not drop_path:  # fused: input LN in the first GEMM, add in the last
                return sublayer(x, input_norm=norm, residual=x, alpha=self.alpha, dropout_p=p)
            y = sublayer(x, input_norm=norm, dropout_p=p)
            return self.alpha * x + self.drop_path(y)
        y = sublayer(x, dropout_p=p)
        if drop_path:
            y = self.drop_path(y)
        out, _ = magneto_kernels.add_layer_norm(
            y,
            x,
            norm.weight,
            norm.bias,
            norm.eps,
            alpha=self.alpha,
            norm=norm.kind,
            backend=self.config.backend,
        )
        return out

    def ffn_block(self, x: Tensor, part: Optional[int] = None) -> Tensor:
        return self.residual_block(x, pick(self.final_layer_norm, part), pick(self.ffn, part))

    def residual_block_parts(
        self, parts: Sequence[Tensor], norm: Multiway, sublayer: Callable[..., list]
    ) -> list[Tensor]:
        """``residual_block`` of a multiway sequence held as two parts: ``sublayer`` takes and
        returns the two parts (with the fused-op keywords; ``input_norm`` the norm pair)."""
        p = self.config.dropout if self.training else 0.0
        drop_path = self.drop_path is not None and self.training
        if self.normalize_before:
            if not drop_path:
                return sublayer(
                    parts, input_norm=norm, residual=parts, alpha=self.alpha, dropout_p=p
                )
            ys = sublayer(parts, input_norm=norm, dropout_p=p)
        else:
            ys = sublayer(parts, dropout_p=p)
        if drop_path:  # one draw per sample, as for the whole sequence
            keep = self.drop_path.sample(parts[0])
            ys = [y * keep / (1.0 - self.drop_path.p) for y in ys]
        if self.normalize_before:
            return [self.alpha * x + y for x, y in zip(parts, ys)]
        return [
            magneto_kernels.add_layer_norm(
                y,
                x,
                norm[part].weight,
                norm[part].bias,
                norm[part].eps,
                alpha=self.alpha,
                norm=norm[part].kind,
                backend=self.config.backend,
            )[0]
            for part, (x, y) in enumerate(zip(parts, ys))
        ]

    def ffn_parts(
        self,
        parts: Sequence[Tensor],
        *,
        input_norm: Optional[Multiway] = None,
        residual: Optional[Sequence[Tensor]] = None,
        **kwargs,
    ) -> list[Tensor]:
        """The feed-forward sublayer of a multiway sequence: each part through its own copy."""
        return [
            self.ffn[part](
                x,
                input_norm=pick(input_norm, part),
                residual=None if residual is None else residual[part],
                **kwargs,
            )
            for part, x in enumerate(parts)
        ]


class EncoderLayer(ResidualLayer):
    """Self-attention block then feed-forward block (torchscale's ``EncoderLayer``)."""

    def __init__(self, config: MagnetoConfig, depth: int = 0, is_encoder_decoder: bool = False):
        super().__init__(config, "encoder", depth, is_encoder_decoder)
        # Built (and initialised) in torchscale's order: self_attn, ffn.
        self.self_attn = MultiheadAttention(config, True, gain=self.scales.self_attn)
        self.self_attn_layer_norm = self._norm()
        self.ffn = (
            Multiway(
                FeedForward(config, gain=self.scales.ffn), FeedForward(config, gain=self.scales.ffn)
            )
            if config.multiway
            else FeedForward(config, gain=self.scales.ffn)
        )
        self.final_layer_norm = self._norm()

    def reset_parameters(self) -> None:
        """Re-initialise with this layer's gains (torchscale order: self_attn, ffn)."""
        self.self_attn.reset_parameters(self.scales.self_attn)
        self.ffn.reset_parameters(self.scales.ffn)
        self.self_attn_layer_norm.reset_parameters()
        self.final_layer_norm.reset_parameters()

    def forward(
        self,
        x: Tensor,
        encoder_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        rel_pos: Optional[Tensor] = None,
        multiway_split_position: Optional[int] = None,
        incremental_state: Optional[dict] = None,
    ) -> tuple[Tensor, None]:
        """torchscale's call; returns ``(x, l_aux=None)``. ``attn_mask`` (tgt, src) masks the
        positions where it is nonzero (torchscale turns them into -1e8 scores).

        ``multiway_split_position`` (multiway models only; ``magneto.multiway``): None or -1 all
        tokens use copy A, 0 copy B, 0 < s < length the first s tokens A and the rest B (the
        input is split into two contiguous parts, run by ``forward_parts``, and joined).
        """
        self._check_input(x)
        part = single_part(self.config.multiway, multiway_split_position, x.shape[1])
        if self.config.multiway and part is None:
            if rel_pos is not None:
                raise ValueError("rel_pos: relative position bias is not supported")
            parts = self.forward_parts(
                split_parts(x, multiway_split_position),
                encoder_padding_mask,
                attn_mask,
                incremental_state,
            )
            return torch.cat(parts, dim=1), None
        if attn_mask is not None:
            attn_mask = attn_mask.to(torch.bool)

        def attention(h, **kw):
            return self.self_attn(
                h,
                h,
                h,
                incremental_state=incremental_state,
                key_padding_mask=encoder_padding_mask,
                attn_mask=attn_mask,
                rel_pos=rel_pos,
                part=part,
                **kw,
            )[0]

        x = self.residual_block(x, pick(self.self_attn_layer_norm, part), attention)
        return self.ffn_block(x, part), None

    def forward_parts(
        self,
        parts: Sequence[Tensor],
        encoder_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
    ) -> list[Tensor]:
        """A multiway layer on a sequence held as two parts, (batch, s, d) for copy A and
        (batch, length - s, d) for copy B; returns the new parts. Masks refer to the whole
        sequence (``forward``'s arguments)."""
        if not self.config.multiway:
            raise ValueError("forward_parts: this layer is not multiway")
        check_parts(parts, self.embed_dim)
        if attn_mask is not None:
            attn_mask = attn_mask.to(torch.bool)

        def attention(xs, **kw):
            return self.self_attn.forward_parts(
                xs, encoder_padding_mask, attn_mask, incremental_state, **kw
            )

        parts = self.residual_block_parts(parts, self.self_attn_layer_norm, attention)
        return self.residual_block_parts(parts, self.final_layer_norm, self.ffn_parts)


class DecoderLayer(ResidualLayer):
    """Causal self-attention, cross-attention (encoder-decoder only), feed-forward."""

    def __init__(self, config: MagnetoConfig, depth: int = 0, is_encoder_decoder: bool = False):
        super().__init__(config, "decoder", depth, is_encoder_decoder)
        if config.multiway:
            raise ValueError("multiway: only encoder layers can be multiway")
        # Built (and initialised) in torchscale's order: self_attn, encoder_attn, ffn.
        self.self_attn = MultiheadAttention(config, True, gain=self.scales.self_attn)
        self.self_attn_layer_norm = self._norm()
        if is_encoder_decoder:
            self.encoder_attn = MultiheadAttention(config, False, gain=self.scales.cross_attn)
            self.encoder_attn_layer_norm = self._norm()
        else:
            self.encoder_attn = None
            self.encoder_attn_layer_norm = None
        self.ffn = FeedForward(config, gain=self.scales.ffn)
        self.final_layer_norm = self._norm()

    def reset_parameters(self) -> None:
        """Re-initialise with this layer's gains (order: self_attn, encoder_attn, ffn)."""
        self.self_attn.reset_parameters(self.scales.self_attn)
        if self.encoder_attn is not None:
            self.encoder_attn.reset_parameters(self.scales.cross_attn)
            self.encoder_attn_layer_norm.reset_parameters()
        self.ffn.reset_parameters(self.scales.ffn)
        self.self_attn_layer_norm.reset_parameters()
        self.final_layer_norm.reset_parameters()

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        self_attn_rel_pos: Optional[Tensor] = None,
        cross_attn_rel_pos: Optional[Tensor] = None,
        is_first_step: bool = False,
        *,
        self_attn_causal: bool = False,
    ) -> tuple[Tensor, None, None, None]:
        """torchscale's call; returns ``(x, attn=None, None, l_aux=None)``.

        ``self_attn_mask`` is torchscale's additive float mask (or bool, True = masked);
        ``self_attn_causal=True`` asks for the causal mask without materialising it.
        """
        self._check_input(x)

        def self_attention(h, **kw):
            return self.self_attn(
                h,
                h,
                h,
                incremental_state=incremental_state,
                key_padding_mask=self_attn_padding_mask,
                attn_mask=self_attn_mask,
                rel_pos=self_attn_rel_pos,
                is_causal=self_attn_causal,
                **kw,
            )[0]

        x = self.residual_block(x, self.self_attn_layer_norm, self_attention)
        if self.encoder_attn is not None and encoder_out is not None:
            # Decoding: the encoder output is the same at every step, so its keys and values
            # are projected once and kept in the layer's state.
            static_kv_cache = None
            if incremental_state is not None:
                static_kv_cache = incremental_state.setdefault("encoder_attn", {})

            def cross_attention(h, **kw):
                return self.encoder_attn(
                    h,
                    encoder_out,
                    encoder_out,
                    key_padding_mask=encoder_padding_mask,
                    rel_pos=cross_attn_rel_pos,
                    static_kv_cache=static_kv_cache,
                    **kw,
                )[0]

            x = self.residual_block(x, self.encoder_attn_layer_norm, cross_attention)
        return self.ffn_block(x), None, None, None
