"""Encoder and decoder layers: residual blocks around attention and feed-forward sublayers.

One residual block, per ``config.norm_scheme`` (x the residual stream, f a sublayer, p the
output dropout, alpha from ``magneto.init.layer_scales``):

- subln / pre: ``x <- alpha·x + dropout(f(LN(x)))``. The input LN is fused into f's first
  projection and the add into its last (``ln_linear(..., residual=x, alpha=alpha)``).
- post / deepnorm: ``x <- LN(alpha·x + dropout(f(x)))`` with ``add_layer_norm``.

With drop path active (training, rate > 0) the add is unfused: f runs without ``residual``,
its output is scaled per sample, then added (Post-LN/DeepNorm: then ``add_layer_norm``).
Parameter names follow torchscale (``self_attn``, ``self_attn_layer_norm``, ``encoder_attn``,
``encoder_attn_layer_norm``, ``ffn``, ``final_layer_norm``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

import magneto_kernels
from magneto.attention import MultiheadAttention
from magneto.config import MagnetoConfig
from magneto.feedforward import FeedForward
from magneto.init import layer_scales
from magneto.norm import Norm


class DropPath(nn.Module):
    """Stochastic depth: each sample's branch is zeroed with probability p, else scaled 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

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

    def _norm(self) -> Norm:
        c = self.config
        return Norm(c.embed_dim, c.eps, c.norm, c.backend)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a (batch, length, embed_dim={self.embed_dim}) Tensor, "
                             f"got {shape}")

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
        out, _ = magneto_kernels.add_layer_norm(y, x, norm.weight, norm.bias, norm.eps,
                                                alpha=self.alpha, norm=norm.kind,
                                                backend=self.config.backend)
        return out

    def ffn_block(self, x: Tensor) -> Tensor:
        return self.residual_block(x, self.final_layer_norm, self.ffn)


class EncoderLayer(ResidualLayer):
    """Self-attention block then feed-forward block (torchscale's ``EncoderLayer``)."""

    def __init__(self, config: MagnetoConfig, depth: int = 0, is_encoder_decoder: bool = False):
        super().__init__(config, "encoder", depth, is_encoder_decoder)
        # Built (and initialised) in torchscale's order: self_attn, ffn.
        self.self_attn = MultiheadAttention(config, True, gain=self.scales.self_attn)
        self.self_attn_layer_norm = self._norm()
        self.ffn = FeedForward(config, gain=self.scales.ffn)
        self.final_layer_norm = self._norm()

    def reset_parameters(self) -> None:
        """Re-initialise with this layer's gains (torchscale order: self_attn, ffn)."""
        self.self_attn.reset_parameters(self.scales.self_attn)
        self.ffn.reset_parameters(self.scales.ffn)
        self.self_attn_layer_norm.reset_parameters()
        self.final_layer_norm.reset_parameters()

    def forward(self, x: Tensor, encoder_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, rel_pos: Optional[Tensor] = None,
                multiway_split_position: Optional[int] = None,
                incremental_state: Optional[dict] = None) -> tuple[Tensor, None]:
        """torchscale's call; returns ``(x, l_aux=None)``. ``attn_mask`` (tgt, src) masks the
        positions where it is nonzero (torchscale turns them into -1e8 scores)."""
        if multiway_split_position is not None:
            raise ValueError("multiway_split_position: multiway layers are not supported")
        self._check_input(x)
        if attn_mask is not None:
            attn_mask = attn_mask.to(torch.bool)

        def attention(h, **kw):
            return self.self_attn(h, h, h, incremental_state=incremental_state,
                                  key_padding_mask=encoder_padding_mask, attn_mask=attn_mask,
                                  rel_pos=rel_pos, **kw)[0]

        x = self.residual_block(x, self.self_attn_layer_norm, attention)
        return self.ffn_block(x), None


class DecoderLayer(ResidualLayer):
    """Causal self-attention, cross-attention (encoder-decoder only), feed-forward."""

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

    def forward(self, x: Tensor, encoder_out: Optional[Tensor] = None,
                encoder_padding_mask: Optional[Tensor] = None,
                incremental_state: Optional[dict] = None, self_attn_mask: Optional[Tensor] = None,
                self_attn_padding_mask: Optional[Tensor] = None,
                self_attn_rel_pos: Optional[Tensor] = None,
                cross_attn_rel_pos: Optional[Tensor] = None, is_first_step: bool = False, *,
                self_attn_causal: bool = False) -> tuple[Tensor, None, None, None]:
        """torchscale's call; returns ``(x, attn=None, None, l_aux=None)``.

        ``self_attn_mask`` is torchscale's additive float mask (or bool, True = masked);
        ``self_attn_causal=True`` asks for the causal mask without materialising it.
        """
        self._check_input(x)

        def self_attention(h, **kw):
            return self.self_attn(h, h, h, incremental_state=incremental_state,
                                  key_padding_mask=self_attn_padding_mask, attn_mask=self_attn_mask,
                                  rel_pos=self_attn_rel_pos, is_causal=self_attn_causal, **kw)[0]

        x = self.residual_block(x, self.self_attn_layer_norm, self_attention)
        if self.encoder_attn is not None and encoder_out is not None:
            def cross_attention(h, **kw):
                return self.encoder_attn(h, encoder_out, encoder_out,
                                         key_padding_mask=encoder_padding_mask,
                                         rel_pos=cross_attn_rel_pos, **kw)[0]

            x = self.residual_block(x, self.encoder_attn_layer_norm, cross_attention)
        return self.ffn_block(x), None, None, None
