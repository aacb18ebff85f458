"""The Magneto encoder: embeddings, a stack of ``EncoderLayer``, final norm, output projection.

Same constructor arguments, forward call and returned dict as torchscale 0.3.0's ``Encoder``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import magneto_kernels
from magneto import init
from magneto.config import MagnetoConfig
from magneto.embeddings import (LearnedPositionalEmbedding, build_output_projection,
                                build_positions, build_token_embedding)
from magneto.layers import EncoderLayer
from magneto.norm import Norm, norm_kwargs


class _Stack(nn.Module):
    """What Encoder and Decoder share: embeddings they own, the final norm + output projection."""

    def _build(self, config: MagnetoConfig, embed_tokens, embed_positions, output_projection,
               is_encoder_decoder: bool, layer_type: type, num_layers: int, want_projection: bool,
               final_norm: bool) -> None:
        """Embeddings, ``num_layers`` layers of ``layer_type`` and the optional final norm, built
        (and so initialised) in torchscale's order."""
        if not isinstance(config, MagnetoConfig):
            raise ValueError(f"config must be a MagnetoConfig, got {type(config).__name__}")
        self.config = self.args = config
        self.is_encoder_decoder = is_encoder_decoder
        self.embed_dim = config.embed_dim
        self.embed_scale = math.sqrt(config.embed_dim) if config.scale_embedding else 1.0
        self.dropout_module = nn.Dropout(config.dropout)
        self._setup_embeddings(config, embed_tokens, embed_positions, output_projection,
                               want_projection)
        self.layers = nn.ModuleList(layer_type(config, i, is_encoder_decoder)
                                    for i in range(num_layers))
        self.layer_norm = (Norm(config.embed_dim, config.eps, config.norm, config.backend)
                           if final_norm else None)
        self.num_layers = len(self.layers)

    def reset_parameters(self) -> None:
        self._reset_embeddings()
        for layer in self.layers:
            layer.reset_parameters()
        if self.layer_norm is not None:
            self.layer_norm.reset_parameters()

    def _scaled_token_embedding(self, tokens: Optional[Tensor],
                                token_embedding: Optional[Tensor]) -> Tensor:
        """``embed_scale · (token_embedding or embed_tokens(tokens))``."""
        if token_embedding is None:
            if self.embed_tokens is None:
                kind = type(self).__name__.lower()
                raise ValueError(f"token_embeddings must be given: this {kind} has no embed_tokens")
            token_embedding = self.embed_tokens(tokens)
        if self.embed_scale == 1.0:  # no copy to save for backward
            return token_embedding
        return self.embed_scale * token_embedding

    def _setup_embeddings(self, config: MagnetoConfig, embed_tokens, embed_positions,
                          output_projection, want_projection: bool) -> None:
        """Use the given modules; build (and initialise) the missing ones ``config`` asks for."""
        self._owned = set()
        if embed_tokens is None and config.vocab_size > 0:
            embed_tokens = build_token_embedding(config)
            self._owned.add("embed_tokens")
        if embed_positions is None and config.positions != "none":
            embed_positions = build_positions(config)
            self._owned.add("embed_positions")
        self.embed_tokens, self.embed_positions = embed_tokens, embed_positions
        if output_projection is None and want_projection and config.output_projection \
                and config.vocab_size > 0:
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
        if "embed_positions" in self._owned and isinstance(self.embed_positions,
                                                             LearnedPositionalEmbedding):
            init.init_learned_positions_(self.embed_positions, scheme)
        if "output_projection" in self._owned:
            init.init_output_projection_(self.output_projection, scheme)

    def _run_layer(self, layer: nn.Module, *args, **kwargs):
        """``layer(*args, **kwargs)``, recomputed in backward when checkpointing is on."""
        if self.config.checkpoint_activations and self.training and torch.is_grad_enabled() \
                and kwargs.get("incremental_state") is None:
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    def _finish(self, x: Tensor, features_only: bool) -> Tensor:
        """Final norm (Pre-LN/Sub-LN) and output projection; one fused ``ln_linear`` when both
        apply and the projection is linear."""
        project = not features_only and self.output_projection is not None
        if project and isinstance(self.output_projection, nn.Linear):
            return magneto_kernels.ln_linear(
                x, weight=self.output_projection.weight, bias=self.output_projection.bias,
                backend=self.config.backend, **norm_kwargs(self.layer_norm))
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.output_projection(x) if project else x


class Encoder(_Stack):
    """Magneto (or Pre-LN / Post-LN / DeepNorm) encoder.

    ``embed_tokens``/``embed_positions``/``output_projection``: modules to use; when None and
    ``config`` asks for them (``vocab_size > 0``, ``positions``), they are built and owned.
    ``is_encoder_decoder``: this is the encoder of an encoder-decoder (its init and DeepNorm
    alpha depend on the decoder depth; it gets no output projection of its own).

    Parameters are initialised per ``config.init`` as they are built, drawing from torch's
    generator in torchscale's order (the same seed gives torchscale's model with
    ``init="torchscale"``); ``reset_parameters()`` redraws them in that order.
    """

    def __init__(self, config: MagnetoConfig, embed_tokens: Optional[nn.Module] = None,
                 embed_positions: Optional[nn.Module] = None,
                 output_projection: Optional[nn.Module] = None, is_encoder_decoder: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self._build(config, embed_tokens, embed_positions, output_projection, is_encoder_decoder,
                    EncoderLayer, config.encoder_layers, want_projection=not is_encoder_decoder,
                    final_norm=config.normalize_before and config.normalize_output)

    def forward_embedding(self, src_tokens: Optional[Tensor],
                          token_embedding: Optional[Tensor] = None,
                          positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        x = embed = self._scaled_token_embedding(src_tokens, token_embedding)
        if self.embed_positions is not None:
            source = src_tokens if src_tokens is not None else x
            x = embed + self.embed_positions(source, positions=positions)
        return self.dropout_module(x), embed

    def forward(self, src_tokens: Optional[Tensor], encoder_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, return_all_hiddens: bool = False,
                token_embeddings: Optional[Tensor] = None,
                multiway_split_position: Optional[int] = None, features_only: bool = False,
                incremental_state: Optional[list] = None, positions: Optional[Tensor] = None,
                **kwargs) -> dict:
        """torchscale's call and result: ``{"encoder_out", "encoder_embedding",
        "encoder_padding_mask", "encoder_states", "l_aux"}``.

        ``src_tokens`` (batch, length) token ids and/or ``token_embeddings`` (batch, length, d);
        ``encoder_padding_mask`` (batch, length), True at padding; ``attn_mask`` (length, length),
        nonzero = masked; ``incremental_state``: a list with one dict per layer (key/value cache).
        """
        if multiway_split_position is not None:
            raise ValueError("multiway_split_position: multiway encoders are not supported")
        batch, length = self._check_inputs(src_tokens, token_embeddings)
        given_mask = encoder_padding_mask
        if encoder_padding_mask is None:
            device = (src_tokens if src_tokens is not None else token_embeddings).device
            encoder_padding_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        elif tuple(encoder_padding_mask.shape) != (batch, length):
            raise ValueError(f"encoder_padding_mask must have shape (batch, length) = "
                             f"{(batch, length)}, got {tuple(encoder_padding_mask.shape)}")

        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings, positions)
        if given_mask is not None:  # zero the padded rows (a no-op, and a saved copy, without)
            x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        encoder_states = [x] if return_all_hiddens else []
        l_aux = []
        # Only a mask the caller gave reaches attention: an all-False one would only slow SDPA.
        layer_mask = given_mask if incremental_state is None else None
        for idx, layer in enumerate(self.layers):
            state = incremental_state[idx] if incremental_state is not None else None
            x, l_aux_i = self._run_layer(layer, x, encoder_padding_mask=layer_mask,
                                         attn_mask=attn_mask, incremental_state=state)
            if return_all_hiddens:
                encoder_states.append(x)
            l_aux.append(l_aux_i)
        return {
            "encoder_out": self._finish(x, features_only),
            "encoder_embedding": encoder_embedding,
            "encoder_padding_mask": encoder_padding_mask,
            "encoder_states": encoder_states,
            "l_aux": l_aux,
        }

    def _check_inputs(self, src_tokens: Optional[Tensor],
                      token_embeddings: Optional[Tensor]) -> tuple[int, int]:
        if src_tokens is None and token_embeddings is None:
            raise ValueError("src_tokens or token_embeddings must be given")
        if token_embeddings is not None:
            if token_embeddings.dim() != 3 or token_embeddings.shape[-1] != self.embed_dim:
                raise ValueError(f"token_embeddings must have shape (batch, length, embed_dim="
                                 f"{self.embed_dim}), got {tuple(token_embeddings.shape)}")
            shape = tuple(token_embeddings.shape[:2])
        else:
            shape = tuple(src_tokens.shape)
        if src_tokens is not None and (src_tokens.dim() != 2 or tuple(src_tokens.shape) != shape):
            raise ValueError(f"src_tokens must have shape (batch, length) = {shape}, got "
                             f"{tuple(src_tokens.shape)}")
        return shape
