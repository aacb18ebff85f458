"""Token embeddings, learned and sinusoidal position embeddings, output projection.

Forward signatures follow torchscale's (``embed_positions(x, positions=None, incremental_state=
None)`` returning ``(1 or batch, length, d)``), so these modules and torchscale's are
interchangeable inside an ``Encoder``/``Decoder``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from magneto.config import MagnetoConfig


class TokenEmbedding(nn.Embedding):
    """Token embedding, N(0, d^-1/2) with a zero padding row (torchscale's ``TextEmbedding``)."""

    def reset_parameters(self) -> None:
        from magneto.init import init_token_embedding_

        init_token_embedding_(self)


def _default_positions(x: Tensor, offset: int) -> Tensor:
    return torch.arange(offset, x.size(1) + offset, device=x.device).unsqueeze(0)


class LearnedPositionalEmbedding(nn.Embedding):
    """Learned absolute positions, laid out as torchscale's ``PositionalEmbedding``.

    Position ids start at ``OFFSET = 2`` (the fairseq convention torchscale keeps), so a table
    for ``max_positions`` tokens has ``max_positions + 2`` rows; ``positions`` overrides the ids.
    """

    OFFSET = 2

    def forward(self, x: Tensor, positions: Optional[Tensor] = None, **kwargs) -> Tensor:
        if positions is None:
            if x.size(1) + self.OFFSET > self.num_embeddings:
                raise ValueError(
                    f"sequence length {x.size(1)} exceeds the position table "
                    f"({self.num_embeddings - self.OFFSET} positions)"
                )
            positions = _default_positions(x, self.OFFSET)
        return super().forward(positions)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoids (Vaswani et al.): row p is ``[sin(p·w_0..w_{h-1}), cos(p·w_0..w_{h-1})]``
    with ``w_i = 10000^(-i/(h-1))``, h = d/2 (the tensor2tensor/fairseq layout; a zero column is
    appended when d is odd). Positions start at 0; the table is a non-persistent buffer.
    """

    def __init__(self, embedding_dim: int, max_positions: int):
        super().__init__()
        self.embedding_dim, self.max_positions = embedding_dim, max_positions
        half = embedding_dim // 2
        freqs = torch.exp(
            torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / max(half - 1, 1))
        )
        angles = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1) * freqs
        table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        if embedding_dim % 2:
            table = torch.cat([table, torch.zeros(max_positions, 1, dtype=torch.float64)], dim=1)
        self.register_buffer("weight", table.float(), persistent=False)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None, **kwargs) -> Tensor:
        if positions is None:
            if x.size(1) > self.max_positions:
                raise ValueError(
                    f"sequence length {x.size(1)} exceeds max_positions={self.max_positions}"
                )
            positions = _default_positions(x, 0)
        return self.weight[positions]

    def extra_repr(self) -> str:
        return f"{self.embedding_dim}, max_positions={self.max_positions}"


def build_token_embedding(config: MagnetoConfig) -> TokenEmbedding:
    """Uninitialised (``magneto.init.init_token_embedding_`` initialises it)."""
    weight = torch.empty(config.vocab_size, config.embed_dim)
    return TokenEmbedding(
        config.vocab_size, config.embed_dim, padding_idx=config.padding_idx, _weight=weight
    )


def build_positions(config: MagnetoConfig) -> Optional[nn.Module]:
    """The position embedding ``config.positions`` asks for (None for "none"); a learned one is
    uninitialised (``magneto.init.init_learned_positions_`` initialises it)."""
    if config.positions == "learned":
        rows = config.max_positions + LearnedPositionalEmbedding.OFFSET
        return LearnedPositionalEmbedding(
            rows, config.embed_dim, _weight=torch.empty(rows, config.embed_dim)
        )
    if config.positions == "sinusoidal":
        return SinusoidalPositionalEmbedding(config.embed_dim, config.max_positions)
    return None


def build_output_projection(
    config: MagnetoConfig, embed_tokens: Optional[nn.Embedding] = None
) -> nn.Linear:
    """Bias-free ``d -> vocab`` projection, tied to ``embed_tokens`` when given, else
    uninitialised (``magneto.init.init_output_projection_`` initialises it)."""
    from magneto.init import uninitialized_linear

    projection = uninitialized_linear(config.embed_dim, config.vocab_size, bias=False)
    if embed_tokens is not None:
        projection.weight = embed_tokens.weight
    return projection
