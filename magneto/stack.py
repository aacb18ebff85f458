"""The stack ``Encoder`` and ``Decoder`` share: embeddings, layers, final norm, output projection.

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
from magneto.embeddings import (
    LearnedPositionalEmbedding,
    build_output_projection,
    build_positions,
    build_token_embedding,
)
from magneto.fusion import project
from magneto.multiway import Multiway, pick
from magneto.norm import NormLayer


class Stack(nn.Module):
    """What ``Encoder`` and ``Decoder`` share: the embeddings, a stack of layers, the final norm
    and the output projection.

    A subclass's ``__init__`` calls ``super().__init__`` with its layer type and depth; its
    ``forward`` embeds with ``scaled_token_embedding``, runs each layer through ``run_layer``
    and ends with ``final_output``.
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
        self.layers = nn.ModuleList(
            layer_type(config, i, is_encoder_decoder) for i in range(num_layers)
        )

        def build_norm():
            return NormLayer(config.embed_dim, config.eps, config.norm, config.backend)

        self.layer_norm = None
        if final_norm:  # per modality in a multiway model (torchscale's ``layer_norm.A``)
            self.layer_norm = (
                Multiway(build_norm(), build_norm()) if config.multiway else build_norm()
            )
        self.num_layers = len(self.layers)

    def reset_parameters(self) -> None:
        self._reset_embeddings()
        for layer in self.layers:
            layer.reset_parameters()
        if self.layer_norm is not None:
            self.layer_norm.reset_parameters()

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
