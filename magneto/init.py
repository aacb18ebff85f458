"""Magneto's initialisation (DeepNet-derived gains) and DeepNorm's alpha/beta.

Notation: N encoder layers, M decoder layers. A layer's *gain* multiplies the weights (and, in
torchscale's init, the biases) of ``v_proj``, ``out_proj``, ``fc1`` and ``fc2``; ``q_proj`` and
``k_proj`` keep gain 1. Its *alpha* scales the residual: ``alpha·x + f(x)``.

Sub-LN (Magneto, "Foundation Transformers", Wang et al. 2022), alpha = 1, gain gamma:

- encoder-only (N) / decoder-only (M): gamma = sqrt(log(2N)) / sqrt(log(2M))
- encoder-decoder: encoder gamma = sqrt(log(3M)·log(2N)/3), decoder gamma = sqrt(log(3M));
  the decoder's cross-attention (``encoder_attn``) keeps gain 1.

DeepNorm (DeepNet, Wang et al. 2022), gain beta, also on the decoder's cross-attention:

- encoder-only / decoder-only: alpha = (2N)^(1/4), beta = (8N)^(-1/4)
- encoder-decoder: encoder alpha = 0.81·(N⁴M)^(1/16), decoder alpha = (3M)^(1/4),
  decoder beta = (12M)^(-1/4), encoder beta = 0.87·(N⁴M)^(-1/16) in the paper but
  1.15·(N⁴M)^(-1/16) in torchscale 0.3.0 (``Encoder`` divides by (N⁴M)^(1/16)/1.15).
  ``MagnetoConfig.deepnorm_beta`` picks one; by default it follows ``init``.

Pre-LN and Post-LN: alpha = 1, gain 1.

Two base inits (``MagnetoConfig.init``), both applying the gains above:

- "paper" (default): Xavier normal with the gain as Xavier's gain (the papers' pseudo-code:
  ``xavier_normal_(w, gain=gamma)`` for ffn/v_proj/out_proj, gain 1 for q_proj/k_proj), biases
  zero. Learned position embeddings N(0, d^-1/2).
- "torchscale": what torchscale 0.3.0 actually does. Its ``MultiheadAttention.reset_parameters``
  (Xavier, q/k/v gain 1/sqrt(2)) is never called, so every projection keeps ``nn.Linear``'s
  default init (Kaiming-uniform, bound 1/sqrt(fan_in), bias likewise) and is then multiplied,
  weight and bias, by the gain. Values are drawn in torchscale's construction order (per layer:
  k, v, q, out_proj, [cross k, v, q, out_proj], fc1, fc2; each weight then bias; output
  projection before the layers), so the same seed gives the same parameters as torchscale.
  Learned position embeddings N(0, 1) (``nn.Embedding``'s default, as torchscale's users get).

Both: token embeddings and output projections N(0, d^-1/2) (torchscale's ``TextEmbedding`` and
``build_output_projection``), norms weight 1, bias 0. (docs/design.md, The model.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from magneto.config import MagnetoConfig


class Beta(float):
    """DeepNorm's gain beta = 1/divisor that remembers the divisor: torchscale applies beta as
    ``p.div_(divisor)``, which rounds differently from ``p.mul_(beta)``."""

    divisor: float

    def __new__(cls, divisor: float) -> "Beta":
        beta = super().__new__(cls, 1.0 / divisor)
        beta.divisor = divisor
        return beta


@dataclass(frozen=True)
class LayerScales:
    """Residual scale and init gains of one layer."""

    alpha: float
    self_attn: float  # gain of the self-attention's v_proj and out_proj
    cross_attn: float  # gain of the cross-attention's v_proj and out_proj (decoder of enc-dec)
    ffn: float  # gain of fc1 and fc2


def subln_gamma(
    role: str, encoder_layers: int, decoder_layers: int, is_encoder_decoder: bool
) -> float:
    """Magneto's gain gamma (expressions ordered as torchscale's, so the floats match)."""
    n, m = encoder_layers, decoder_layers
    if role == "encoder":
        if is_encoder_decoder:
            return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3)
        return math.sqrt(math.log(n * 2))
    if is_encoder_decoder:
        return math.sqrt(math.log(m * 3))
    return math.sqrt(math.log(m * 2))


def deepnorm_alpha(
    role: str, encoder_layers: int, decoder_layers: int, is_encoder_decoder: bool
) -> float:
    """DeepNorm's residual scale alpha."""
    n, m = encoder_layers, decoder_layers
    if role == "encoder":
        if is_encoder_decoder:
            return math.pow(math.pow(n, 4) * m, 0.0625) * 0.81
        return math.pow(2.0 * n, 0.25)
    if is_encoder_decoder:
        return math.pow(3.0 * m, 0.25)
    return math.pow(2.0 * m, 0.25)


def deepnorm_beta(
    role: str,
    encoder_layers: int,
    decoder_layers: int,
    is_encoder_decoder: bool,
    variant: str = "paper",
) -> Beta:
    """DeepNorm's gain beta; ``variant`` ("paper"/"torchscale") matters only for the encoder of
    an encoder-decoder."""
    n, m = encoder_layers, decoder_layers
    if role == "encoder":
        if is_encoder_decoder:
            constant = 1.15 if variant == "torchscale" else 0.87
            return Beta(math.pow(math.pow(n, 4) * m, 0.0625) / constant)
        return Beta(math.pow(8.0 * n, 0.25))
    if is_encoder_decoder:
        return Beta(math.pow(12.0 * m, 0.25))
    return Beta(math.pow(8.0 * m, 0.25))


def layer_scales(config: MagnetoConfig, role: str, is_encoder_decoder: bool = False) -> LayerScales:
    """Alpha and gains of a layer in ``role`` ("encoder" or "decoder") for ``config``'s scheme."""
    if role not in ("encoder", "decoder"):
        raise ValueError(f"role must be 'encoder' or 'decoder', got {role!r}")
    n, m = config.encoder_layers, config.decoder_layers
    for name, count, needed in (
        ("encoder_layers", n, role == "encoder" or is_encoder_decoder),
        ("decoder_layers", m, role == "decoder" or is_encoder_decoder),
    ):
        if needed and count < 1:
            raise ValueError(f"{name} must be >= 1 for a layer of this model, got {count}")
    if config.norm_scheme == "subln":
        gamma = subln_gamma(role, n, m, is_encoder_decoder)
        return LayerScales(alpha=1.0, self_attn=gamma, cross_attn=1.0, ffn=gamma)
    if config.norm_scheme == "deepnorm":
        variant = config.deepnorm_beta or config.init
        beta = deepnorm_beta(role, n, m, is_encoder_decoder, variant)
        alpha = deepnorm_alpha(role, n, m, is_encoder_decoder)
        return LayerScales(alpha=alpha, self_attn=beta, cross_attn=beta, ffn=beta)
    return LayerScales(alpha=1.0, self_attn=1.0, cross_attn=1.0, ffn=1.0)


def uninitialized_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` with allocated but uninitialised parameters: no random draws, so the
    caller's init alone decides what the generator stream sees (torchscale's order)."""
    layer = nn.Linear(in_features, out_features, bias=bias, device="meta")
    return layer.to_empty(device=torch.empty(0).device)


@torch.no_grad()
def init_linear_(weight: Tensor, bias: Optional[Tensor], gain: float, scheme: str) -> None:
    """Initialise one projection in place (``weight`` may be a row block of a packed weight)."""
    if scheme == "paper":
        nn.init.xavier_normal_(weight, gain=gain)
        if bias is not None:
            bias.zero_()
        return
    if scheme != "torchscale":
        raise ValueError(f"scheme must be 'paper' or 'torchscale', got {scheme!r}")
    # nn.Linear.reset_parameters, then torchscale's in-place scaling of weight and bias.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)
    for t in (weight, bias):
        if t is not None and isinstance(gain, Beta):
            t.div_(gain.divisor)
        elif t is not None and gain != 1.0:
            t.mul_(gain)


@torch.no_grad()
def init_token_embedding_(embedding: nn.Embedding) -> None:
    """N(0, d^-1/2), padding row zero (torchscale's ``TextEmbedding``)."""
    nn.init.normal_(embedding.weight, mean=0.0, std=embedding.embedding_dim**-0.5)
    if embedding.padding_idx is not None:
        embedding.weight[embedding.padding_idx].zero_()


@torch.no_grad()
def init_learned_positions_(embedding: nn.Embedding, scheme: str) -> None:
    """N(0, d^-1/2) ("paper") or N(0, 1) ("torchscale": nn.Embedding's default); padding row 0."""
    std = 1.0 if scheme == "torchscale" else embedding.embedding_dim**-0.5
    nn.init.normal_(embedding.weight, mean=0.0, std=std)
    if embedding.padding_idx is not None:
        embedding.weight[embedding.padding_idx].zero_()


@torch.no_grad()
def init_output_projection_(projection: nn.Linear, scheme: str) -> None:
    """N(0, d^-1/2). torchscale builds an ``nn.Linear`` (drawing its default init) and redraws;
    with ``scheme="torchscale"`` both draws happen so the random stream stays aligned."""
    if scheme == "torchscale":
        nn.init.kaiming_uniform_(projection.weight, a=math.sqrt(5))
    nn.init.normal_(projection.weight, mean=0.0, std=projection.in_features**-0.5)
    if projection.bias is not None:
        projection.bias.zero_()
