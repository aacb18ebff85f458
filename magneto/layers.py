"""Encoder and decoder layers: residual blocks around attention and feed-forward sublayers.

A layer's forward is one line per residual, ``x = self.residual(x, norm, sublayer, ...)``, which
per ``config.norm_scheme`` is (x the residual stream, f the sublayer, p the output dropout,
alpha from ``magneto.init.layer_scales``):

- subln / pre: ``x <- alpha·x + dropout(f(LN(x)))``. The input LN is fused into f's first
  projection and the add into its last (f takes ``input_norm``, ``residual``, ``alpha`` and
  ``dropout_p``, and hands them to ``ln_linear``).
- post / deepnorm: ``x <- LN(alpha·x + dropout(f(x)))`` with ``add_layer_norm``.

The add is unfused (f runs without ``residual``, its output is added afterwards) with drop path
in training (f's output scaled per sample first) and when f has hooks: f is then called on
LN(x), as ``torch.nn`` calls its sublayers, so that its hooks see f's own input and output.

A mixture-of-experts layer (``config.moe_freq``; ``magneto.moe``) has ``moe_layer`` in place of
``ffn``, the same residual block around it (its gate and experts take the norm, the combine
takes the residual), and returns its ``l_aux``. The encoder hands it the tokens time-major,
the decoder batch-major, as torchscale (the order decides which tokens capacity drops).

Multiway layers (``config.multiway``; ``magneto.multiway``): in an encoder layer the norms and
``ffn`` are ``Multiway`` pairs, as the attention's projections. A single-modality
``multiway_split_position`` runs the block above with one copy; ``forward_parts`` runs the same
block on the sequence held as two parts (each fused op on a contiguous part, with that part's
norm and weights), attention over the whole sequence. In a decoder layer only the attention
projections are pairs, and copy A serves every token (torchscale's multiway decoder).

Parameter names follow torchscale (``self_attn``, ``self_attn_layer_norm``, ``encoder_attn``,
``encoder_attn_layer_norm``, ``ffn`` or ``moe_layer``, ``final_layer_norm``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

import magneto_kernels
from magneto.attention import MultiheadAttention
from magneto.config import MagnetoConfig
from magneto.feedforward import FeedForward
from magneto.fusion import add_norm, has_hooks, warn_unfused
from magneto.init import layer_scales
from magneto.masks import torchscale_mask
from magneto.moe import build_moe_layer
from magneto.multiway import Multiway, check_parts, pick, single_part, split_parts
from magneto.norm import NormLayer

Stream = Union[Tensor, list]
"""The residual stream: a tensor, or a multiway sequence's two parts."""


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


def _hooked(sublayer: nn.Module) -> bool:
    """Whether calling ``sublayer`` (or a copy of a ``Multiway`` one) runs hooks."""
    if has_hooks(sublayer):
        return True
    return isinstance(sublayer, Multiway) and (has_hooks(sublayer.A) or has_hooks(sublayer.B))


def _split(y) -> tuple:
    """A sublayer's output and its second output: attention returns ``(output, weights)``, the
    MoE layer ``(output, l_aux)``, a feed-forward block its output alone (None)."""
    return y if isinstance(y, tuple) else (y, None)


class ResidualLayer(nn.Module):
    """What encoder and decoder layers share: the residual block and its scales."""

    def __init__(self, config: MagnetoConfig, role: str, depth: int, is_encoder_decoder: bool):
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.normalize_before = config.normalize_before
        self.scales = layer_scales(config, role, is_encoder_decoder)
        self.alpha = self.scales.alpha
        # torchscale's multiway decoder has plain norms and FFNs (module docstring)
        self.multiway = config.multiway and role == "encoder"
        num_layers = config.encoder_layers if role == "encoder" else config.decoder_layers
        rate = drop_path_rate(config, depth, num_layers)
        self.drop_path = DropPath(rate) if rate > 0.0 else None

    def _norm(self) -> nn.Module:
        """The layer's norm: a ``Multiway`` pair in a multiway encoder layer."""
        c = self.config

        def build():
            return NormLayer(c.embed_dim, c.eps, c.norm, c.backend)

        return Multiway(build(), build()) if self.multiway else build()

    def _feed_forward(self, depth: int) -> None:
        """``ffn`` (a ``Multiway`` pair in a multiway encoder layer), or ``moe_layer`` in a
        mixture-of-experts layer; the other one None."""
        c, gain = self.config, self.scales.ffn
        self.ffn = self.moe_layer = None
        if c.is_moe_layer(depth):
            if self.multiway:
                raise ValueError("moe_freq: multiway encoder layers cannot be MoE (torchscale)")
            self.moe_layer = build_moe_layer(c, gain)
        elif self.multiway:
            self.ffn = Multiway(FeedForward(c, gain=gain), FeedForward(c, gain=gain))
        else:
            self.ffn = FeedForward(c, gain=gain)

    def reset_parameters(self) -> None:
        """Re-initialise with this layer's gains, in torchscale's order: self_attn,
        encoder_attn (a decoder layer of an encoder-decoder), ffn or moe_layer."""
        self.self_attn.reset_parameters(self.scales.self_attn)
        if getattr(self, "encoder_attn", None) is not None:
            self.encoder_attn.reset_parameters(self.scales.cross_attn)
            self.encoder_attn_layer_norm.reset_parameters()
        (self.ffn or self.moe_layer).reset_parameters(self.scales.ffn)
        self.self_attn_layer_norm.reset_parameters()
        self.final_layer_norm.reset_parameters()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must be a (batch, length, embed_dim={self.embed_dim}) Tensor, got {shape}"
            )

    def residual(
        self, x: Stream, norm: nn.Module, sublayer: nn.Module, aux: bool = False, **kwargs
    ):
        """The residual stream after ``sublayer`` (``kwargs`` go to it), per the norm scheme
        (module docstring). For a multiway sequence's two parts, ``norm`` and ``sublayer`` take
        and return parts (``Multiway`` pairs, or attention). ``aux``: the sublayer returns
        ``(y, aux)`` (the MoE layer's ``l_aux``); return ``(stream, aux)``. (Attention's second
        output, its weights, is dropped.)"""
        p = self.config.dropout if self.training else 0.0
        before = self.normalize_before
        drop_path = self.drop_path is not None and self.training
        hooked = _hooked(sublayer)
        if hooked:  # called as torch.nn calls it: its hooks see its own input and output
            name = next(n for n, m in self.named_modules() if m is sublayer)
            warn_unfused(f"{type(self).__name__}.{name}", sublayer)
            y, extra = _split(sublayer(norm(x) if before else x, dropout_p=0.0, **kwargs))
        elif before and not drop_path:  # fused: input norm in the first GEMM, add in the last
            out = sublayer(x, input_norm=norm, residual=x, alpha=self.alpha, dropout_p=p, **kwargs)
            out, extra = _split(out)
            return (out, extra) if aux else out
        else:
            y, extra = _split(
                sublayer(x, input_norm=norm if before else None, dropout_p=p, **kwargs)
            )
        parts = isinstance(x, list)
        xs, ys = (x, y) if parts else ([x], [y])
        if hooked and p > 0.0:
            ys = [magneto_kernels.dropout(y, p) for y in ys]
        if drop_path:  # one draw per sample, shared by a multiway sequence's parts
            keep = self.drop_path.sample(xs[0])
            ys = [y * keep / (1.0 - self.drop_path.p) for y in ys]
        if before:
            out = [self.alpha * x + y for x, y in zip(xs, ys)]
        else:
            norms = (norm[0], norm[1]) if parts else (norm,)
            site = f"{type(self).__name__}'s norm"
            backend, fp32 = self.config.backend, self.config.residual_in_fp32
            out = [
                add_norm(site, n, y, x, self.alpha, backend, fp32) for n, x, y in zip(norms, xs, ys)
            ]
        out = out if parts else out[0]
        return (out, extra) if aux else out


class EncoderLayer(ResidualLayer):
    """Self-attention block then feed-forward (or MoE) block (torchscale's ``EncoderLayer``)."""

    def __init__(self, config: MagnetoConfig, depth: int = 0, is_encoder_decoder: bool = False):
        super().__init__(config, "encoder", depth, is_encoder_decoder)
        # Built (and initialised) in torchscale's order: self_attn, ffn or moe_layer.
        self.self_attn = MultiheadAttention(config, True, gain=self.scales.self_attn)
        self.self_attn_layer_norm = self._norm()
        self._feed_forward(depth)
        self.final_layer_norm = self._norm()

    def forward(
        self,
        x: Tensor,
        encoder_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        rel_pos: Optional[Tensor] = None,
        multiway_split_position: Optional[int] = None,
        incremental_state: Optional[dict] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """torchscale's call; returns ``(x, l_aux)`` (``l_aux`` None but in an MoE layer).
        ``encoder_padding_mask`` (batch, src) and ``attn_mask`` (tgt, src) mask the positions
        where they are nonzero, whatever their dtype (torchscale's reading;
        ``magneto.masks``); ``rel_pos``: the relative position bias added to the scores,
        (batch·heads, tgt, src) or broadcasting to (batch, heads, tgt, src).

        ``multiway_split_position`` (multiway models only; ``magneto.multiway``): None or -1 all
        tokens use copy A, 0 copy B, 0 < s < length the first s tokens A and the rest B (the
        input is split into two contiguous parts, run by ``forward_parts``, and joined).
        """
        self._check_input(x)
        part = single_part(self.config.multiway, multiway_split_position, x.shape[1])
        if self.config.multiway and part is None:
            parts = split_parts(x, multiway_split_position)
            parts = self.forward_parts(
                parts, encoder_padding_mask, attn_mask, incremental_state, rel_pos=rel_pos
            )
            return torch.cat(parts, dim=1), None
        x = self.residual(
            x,
            pick(self.self_attn_layer_norm, part),
            self.self_attn,
            incremental_state=incremental_state,
            key_padding_mask=torchscale_mask(encoder_padding_mask),
            attn_mask=torchscale_mask(attn_mask),
            rel_pos=rel_pos,
            part=part,
        )
        if self.moe_layer is not None:  # torchscale's encoder routes its tokens time-major
            return self.residual(
                x, self.final_layer_norm, self.moe_layer, aux=True, time_major=True
            )
        return self.residual(x, pick(self.final_layer_norm, part), pick(self.ffn, part)), None

    def forward_parts(
        self,
        parts: Sequence[Tensor],
        encoder_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
        *,
        rel_pos: Optional[Tensor] = None,
    ) -> list[Tensor]:
        """A multiway layer on a sequence held as two parts, (batch, s, d) for copy A and
        (batch, length - s, d) for copy B; returns the new parts. Masks and ``rel_pos`` refer
        to the whole sequence (``forward``'s arguments)."""
        if not self.config.multiway:
            raise ValueError("forward_parts: this layer is not multiway")
        check_parts(parts, self.embed_dim)
        parts = self.residual(
            list(parts),
            self.self_attn_layer_norm,
            self.self_attn,
            key_padding_mask=torchscale_mask(encoder_padding_mask),
            attn_mask=torchscale_mask(attn_mask),
            rel_pos=rel_pos,
            incremental_state=incremental_state,
        )
        return self.residual(parts, self.final_layer_norm, self.ffn)


class DecoderLayer(ResidualLayer):
    """Causal self-attention, cross-attention (encoder-decoder only), feed-forward (or MoE)."""

    def __init__(self, config: MagnetoConfig, depth: int = 0, is_encoder_decoder: bool = False):
        super().__init__(config, "decoder", depth, is_encoder_decoder)
        # Built (and initialised) in torchscale's order: self_attn, encoder_attn, ffn.
        self.self_attn = MultiheadAttention(config, True, gain=self.scales.self_attn)
        self.self_attn_layer_norm = self._norm()
        if is_encoder_decoder:
            self.encoder_attn = MultiheadAttention(config, False, gain=self.scales.cross_attn)
            self.encoder_attn_layer_norm = self._norm()
        else:
            self.encoder_attn = None
            self.encoder_attn_layer_norm = None
        self._feed_forward(depth)
        self.final_layer_norm = self._norm()
        self.part = 0 if config.multiway else None  # the attention copy every token uses

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
    ) -> tuple[Tensor, None, None, Optional[Tensor]]:
        """torchscale's call; returns ``(x, attn=None, None, l_aux)`` (``l_aux`` None but in
        an MoE layer).

        ``self_attn_mask`` is torchscale's additive float mask (or bool, True = masked; an
        integer 0/1 mask: nonzero = masked, where torchscale would add it to the scores);
        padding masks: nonzero = padding, whatever their dtype (``magneto.masks``).
        ``self_attn_causal=True`` asks for the causal mask without materialising it.
        ``self_attn_rel_pos`` / ``cross_attn_rel_pos``: relative position biases added to the
        scores (as ``EncoderLayer``'s ``rel_pos``); ``is_first_step``: xPos's decoding offset
        (``MultiheadAttention``).
        """
        self._check_input(x)
        x = self.residual(
            x,
            self.self_attn_layer_norm,
            self.self_attn,
            incremental_state=incremental_state,
            key_padding_mask=torchscale_mask(self_attn_padding_mask),
            attn_mask=self_attn_mask,
            rel_pos=self_attn_rel_pos,
            is_first_step=is_first_step,
            is_causal=self_attn_causal,
            part=self.part,
        )
        if self.encoder_attn is not None and encoder_out is not None:
            # Decoding: the encoder output is the same at every step, so its keys and values
            # are projected once and kept in the layer's state.
            encoder_kv = None
            if incremental_state is not None:
                encoder_kv = incremental_state.setdefault("encoder_attn", {})
            x = self.residual(
                x,
                self.encoder_attn_layer_norm,
                self.encoder_attn,
                key=encoder_out,
                value=encoder_out,
                key_padding_mask=torchscale_mask(encoder_padding_mask),
                rel_pos=cross_attn_rel_pos,
                static_kv_cache=encoder_kv,
                part=self.part,
            )
        if self.moe_layer is not None:
            x, l_aux = self.residual(x, self.final_layer_norm, self.moe_layer, aux=True)
            return x, None, None, l_aux
        return self.residual(x, self.final_layer_norm, self.ffn), None, None, None
