"""The Magneto encoder: embeddings, a stack of ``EncoderLayer``, final norm, output projection.

Same constructor arguments, forward call and returned dict as torchscale 0.3.0's ``Encoder``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from magneto.config import MagnetoConfig
from magneto.layers import EncoderLayer
from magneto.stack import Stack


class Encoder(Stack):
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
        super().__init__(config, embed_tokens, embed_positions, output_projection,
                         is_encoder_decoder, EncoderLayer, config.encoder_layers,
                         want_projection=not is_encoder_decoder,
                         final_norm=config.normalize_before and config.normalize_output, **kwargs)

    def forward_embedding(self, src_tokens: Optional[Tensor],
                          token_embedding: Optional[Tensor] = None,
                          positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        x = embed = self.scaled_token_embedding(src_tokens, token_embedding)
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
            x, l_aux_i = self.run_layer(layer, x, encoder_padding_mask=layer_mask,
                                         attn_mask=attn_mask, incremental_state=state)
            if return_all_hiddens:
                encoder_states.append(x)
            l_aux.append(l_aux_i)
        return {
            "encoder_out": self.final_output(x, features_only),
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
