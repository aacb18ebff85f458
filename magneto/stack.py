"""The stack ``Encoder`` and ``Decoder`` share: embeddings (and ``layernorm_embedding``), layers,
final norm, relative position tables, output projection.

Everything is built, and so initialised, in torchscale 0.3.0's order, so that the same seed
gives torchscale's parameters with ``init="torchscale"``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from magneto import init
from magneto.config import MagnetoConfig
from magneto.embedding_norm import embedding_output
from magneto.embeddings import (
    LearnedPositionalEmbedding,
    build_output_projection,
    build_positions,
    build_token_embedding,
)
from magneto.fusion import project
from magneto.multiway import Multiway, pick
from magneto.norm import NormLayer
from magneto.relative_position import RelativePositionBias


class Stack(nn.Module):
    """What ``Encoder`` and ``Decoder`` share: the embeddings, a stack of layers, the final norm
    and the output projection.

    A subclass's ``__init__`` calls ``super().__init__`` with its layer type and depth, then
    builds its relative position tables (``relative_positions``); its ``forward`` embeds with
    ``scaled_token_embedding`` and ``embedding_output``, runs each layer through ``run_layer``
    and ends with ``final_output``. ``multiway``: the stack's own norms (``layernorm_embedding``,
    ``layer_norm``) are ``Multiway`` pairs (a multiway encoder; torchscale's multiway decoder
    has plain ones).
    """

    def __init__(
        self,
        config: MagnetoConfig,
        embed_tokens,
        embed_positions,
        output_projection,
        is_encoder_decoder: bool,
        layer_type: type,
        num_layers: int,
        *,
        want_projection: bool,
        final_norm: bool,
        multiway: bool = False,
        **kwargs,
    ):
        """Embeddings, ``num_layers`` layers of ``layer_type`` and the optional final norm, built
        (and so initialised) in torchscale's order."""
        super().__init__(**kwargs)
        if not isinstance(config, MagnetoConfig):
            raise ValueError(f"config must be a MagnetoConfig, got {type(config).__name__}")
        self.config = self.args = config
        self.is_encoder_decoder = is_encoder_decoder
        self.embed_dim = config.embed_dim
        self.embed_scale = math.sqrt(config.embed_dim) if config.scale_embedding else 1.0
        self.dropout_module = nn.Dropout(config.dropout)
        self._setup_embeddings(
            config, embed_tokens, embed_positions, output_projection, want_projection
        )

        def build_norm():  # per modality in a multiway encoder (torchscale's ``layer_norm.A``)
            def one():
                return NormLayer(config.embed_dim, config.eps, config.norm, config.backend)

            return Multiway(one(), one()) if multiway else one()

        self.layernorm_embedding = build_norm() if config.layernorm_embedding else None
        self.layers = nn.ModuleList(
            layer_type(config, i, is_encoder_decoder) for i in range(num_layers)
        )
        self.layer_norm = build_norm() if final_norm else None
        self.num_layers = len(self.layers)

    def relative_positions(self) -> Optional[RelativePositionBias]:
        """A relative position table per ``config.rel_pos_buckets``/``max_rel_pos`` (None when
        off); torchscale builds them after the final norm, each drawing its N(0, 1) init."""
        c = self.config
        if c.rel_pos_buckets == 0:
            return None
        return RelativePositionBias(c.rel_pos_buckets, c.max_rel_pos, c.num_heads)

    def reset_parameters(self) -> None:
        self._reset_embeddings()
        for layer in self.layers:
            layer.reset_parameters()
        for norm in (self.layernorm_embedding, self.layer_norm):
            if norm is not None:
                norm.reset_parameters()
        for table in self.relative_position_tables():
            table.reset_parameters()

    def relative_position_tables(self) -> list[RelativePositionBias]:
        """The stack's relative position tables, in build order (a subclass's)."""
        return []

    def scaled_token_embedding(
        self, tokens: Optional[Tensor], token_embedding: Optional[Tensor]
    ) -> Tensor:
        """``embed_scale · (token_embedding or embed_tokens(tokens))``."""
        if token_embedding is None:
            if self.embed_tokens is None:
                kind = type(self).__name__.lower()
                raise ValueError(f"token_embeddings must be given: this {kind} has no embed_tokens")
            token_embedding = self.embed_tokens(tokens)
        if self.embed_scale == 1.0:  # no copy to save for backward
            return token_embedding
        return self.embed_scale * token_embedding

    def _setup_embeddings(
        self,
        config: MagnetoConfig,
        embed_tokens,
        embed_positions,
        output_projection,
        want_projection: bool,
    ) -> None:
        """Use the given modules; build (and initialise) the missing ones ``config`` asks for."""
        self._owned = set()
        if embed_tokens is None and config.vocab_size > 0:
            embed_tokens = build_token_embedding(config)
            self._owned.add("embed_tokens")
        if embed_positions is None and config.positions != "none":
            embed_positions = build_positions(config)
            self._owned.add("embed_positions")
        self.embed_tokens, self.embed_positions = embed_tokens, embed_positions
        if (
            output_projection is None
            and want_projection
            and config.output_projection
            and config.vocab_size > 0
        ):
            tied = self.embed_tokens if config.share_input_output_embed else None
            output_projection = build_output_projection(config, tied)
            if tied is None:
                self._owned.add("output_projection")
        self.output_projection = output_projection
        self._reset_embeddings()

    def _reset_embeddings(self) -> None:
        """Init the embeddings this module built, in torchscale's order (tokens, positions,
        output projection) — a torchscale user builds the first two before the model."""
        scheme = self.config.init
        if "embed_tokens" in self._owned:
            init.init_token_embedding_(self.embed_tokens)
        if "embed_positions" in self._owned and isinstance(
            self.embed_positions, LearnedPositionalEmbedding
        ):
            init.init_learned_positions_(self.embed_positions, scheme)
        if "output_projection" in self._owned:
            init.init_output_projection_(self.output_projection, scheme)

    def embedding_output(
        self, embed: Tensor, positions: Optional[Tensor], part: Optional[int] = None
    ) -> Tensor:
        """``dropout(layernorm_embedding(embed + positions))`` (``magneto.embedding_norm``);
        ``part``: the copy of a ``Multiway`` embedding norm the tokens use."""
        norm = pick(self.layernorm_embedding, part)
        return embedding_output(embed, positions, norm, self.dropout_module)

    def run_layer(self, layer: nn.Module, *args, **kwargs):
        """``layer(*args, **kwargs)``, recomputed in backward when checkpointing is on."""
        if (
            self.config.checkpoint_activations
            and self.training
            and torch.is_grad_enabled()
            and kwargs.get("incremental_state") is None
        ):
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    def final_output(self, x: Tensor, features_only: bool, part: Optional[int] = None) -> Tensor:
        """Final norm (Pre-LN/Sub-LN; copy ``part`` of a multiway one) and output projection;
        one fused ``ln_linear`` when both apply."""
        layer_norm = pick(self.layer_norm, part)
        if features_only or self.output_projection is None:
            return x if layer_norm is None else layer_norm(x)
        site = f"{type(self).__name__}.output_projection"
        return project(site, x, self.output_projection, layer_norm, backend=self.config.backend)
