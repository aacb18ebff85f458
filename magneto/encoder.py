"""The Magneto encoder: embeddings, a stack of ``EncoderLayer``, final norm, output projection.

Same constructor arguments, forward call and returned dict as torchscale 0.3.0's ``Encoder``,
its options included (``magneto.config``): ``layernorm_embedding``, a relative position table
(``relative_position``, its bias computed once per forward and added in every layer), xPos,
mixture-of-experts layers (their ``l_aux`` in the result), multiway layers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from magneto.config import MagnetoConfig
from magneto.layers import EncoderLayer
from magneto.multiway import Multiway, pick, single_part
from magneto.relative_position import RelativePositionBias
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

    def __init__(
        self,
        config: MagnetoConfig,
        embed_tokens: Optional[nn.Module] = None,
        embed_positions: Optional[nn.Module] = None,
        output_projection: Optional[nn.Module] = None,
        is_encoder_decoder: bool = False,
        **kwargs,
    ):
        super().__init__(
            config,
            embed_tokens,
            embed_positions,
            output_projection,
            is_encoder_decoder,
            EncoderLayer,
            config.encoder_layers,
            want_projection=not is_encoder_decoder,
            final_norm=config.normalize_before and config.normalize_output,
            multiway=config.multiway,
            **kwargs,
        )
        self.relative_position = self.relative_positions()

    def relative_position_tables(self) -> list[RelativePositionBias]:
        return [t for t in (self.relative_position,) if t is not None]

    def forward_embedding(
        self,
        src_tokens: Optional[Tensor],
        token_embedding: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        *,
        part: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """``(dropout(layernorm_embedding(embedding + positions)), embedding)``; ``part``: the
        copy of a ``Multiway`` position embedding and embedding norm every token uses."""
        embed = self.scaled_token_embedding(src_tokens, token_embedding)
        table = None
        if self.embed_positions is not None:
            source = src_tokens if src_tokens is not None else embed
            table = pick(self.embed_positions, part)(source, positions=positions)
        return self.embedding_output(embed, table, part), embed

    def forward_embedding_parts(
        self,
        src_tokens: Optional[Tensor],
        token_embedding: Optional[Tensor],
        positions: Optional[Tensor],
        split: int,
    ) -> tuple[list[Tensor], Tensor]:
        """The embedded sequence as two contiguous parts (tokens before and after ``split``),
        and the whole embedding. A ``Multiway`` position embedding numbers each part from its
        own start (torchscale's ``MutliwayEmbedding``); another one numbers the whole sequence.
        """
        embed = self.scaled_token_embedding(src_tokens, token_embedding)
        sizes = [split, embed.shape[1] - split]
        parts = embed.split(sizes, dim=1)
        tables = [None, None]
        if isinstance(self.embed_positions, Multiway):
            sources = parts if src_tokens is None else src_tokens.split(sizes, dim=1)
            tables = [
                self.embed_positions[part](source, positions=positions)
                for part, source in enumerate(sources)
            ]
        elif self.embed_positions is not None:
            source = src_tokens if src_tokens is not None else embed
            tables = self.embed_positions(source, positions=positions).split(sizes, dim=1)
        return [
            self.embedding_output(x, table, part).contiguous()
            for part, (x, table) in enumerate(zip(parts, tables))
        ], embed

    def forward(
        self,
        src_tokens: Optional[Tensor],
        encoder_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        multiway_split_position: Optional[int] = None,
        features_only: bool = False,
        incremental_state: Optional[list] = None,
        positions: Optional[Tensor] = None,
        **kwargs,
    ) -> dict:
        """torchscale's call and result: ``{"encoder_out", "encoder_embedding",
        "encoder_padding_mask", "encoder_states", "l_aux"}``.

        ``src_tokens`` (batch, length) token ids and/or ``token_embeddings`` (batch, length, d);
        ``encoder_padding_mask`` (batch, length), True at padding; ``attn_mask`` (length, length),
        nonzero = masked; ``incremental_state``: a list with one dict per layer (key/value cache).
        ``multiway_split_position`` (multiway encoders): see ``magneto.multiway``; a split
        inside the sequence carries the residual stream as two parts from the embedding to the
        final norm. (torchscale keeps a split until the next call that passes one; here a call
        without one uses copy A, as torchscale's first call does.)
        """
        batch, length = self._check_inputs(src_tokens, token_embeddings)
        part = single_part(self.config.multiway, multiway_split_position, length)
        given_mask = encoder_padding_mask
        if encoder_padding_mask is None:
            device = (src_tokens if src_tokens is not None else token_embeddings).device
            encoder_padding_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        elif tuple(encoder_padding_mask.shape) != (batch, length):
            raise ValueError(
                f"encoder_padding_mask must have shape (batch, length) = "
                f"{(batch, length)}, got {tuple(encoder_padding_mask.shape)}"
            )

        # Only a mask the caller gave reaches attention: an all-False one would only slow SDPA.
        layer_mask = given_mask if incremental_state is None else None
        rel_pos = None  # one (1, heads, length, length) bias for every layer
        if self.relative_position is not None:
            rel_pos = self.relative_position.bias(length, length)
        if self.config.multiway and part is None:
            parts, encoder_embedding = self.forward_embedding_parts(
                src_tokens, token_embeddings, positions, multiway_split_position
            )
            if given_mask is not None:
                keep = 1 - encoder_padding_mask.unsqueeze(-1).type_as(parts[0])
                keep = keep.split([p.shape[1] for p in parts], dim=1)
                parts = [x * k for x, k in zip(parts, keep)]
            encoder_states = [torch.cat(parts, dim=1)] if return_all_hiddens else []
            for idx, layer in enumerate(self.layers):
                state = incremental_state[idx] if incremental_state is not None else None
                parts = self.run_layer(
                    layer.forward_parts,
                    parts,
                    encoder_padding_mask=layer_mask,
                    attn_mask=attn_mask,
                    incremental_state=state,
                    rel_pos=rel_pos,
                )
                if return_all_hiddens:
                    encoder_states.append(torch.cat(parts, dim=1))
            out = torch.cat(
                [self.final_output(x, features_only, part) for part, x in enumerate(parts)], dim=1
            )
            return self._result(
                out,
                encoder_embedding,
                encoder_padding_mask,
                encoder_states,
                [None] * len(self.layers),
            )

        x, encoder_embedding = self.forward_embedding(
            src_tokens, token_embeddings, positions, part=part
        )
        if given_mask is not None:  # zero the padded rows (a no-op, and a saved copy, without)
            x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        encoder_states = [x] if return_all_hiddens else []
        l_aux = []
        for idx, layer in enumerate(self.layers):
            state = incremental_state[idx] if incremental_state is not None else None
            x, l_aux_i = self.run_layer(
                layer,
                x,
                encoder_padding_mask=layer_mask,
                attn_mask=attn_mask,
                rel_pos=rel_pos,
                incremental_state=state,
                multiway_split_position=multiway_split_position,
            )
            if return_all_hiddens:
                encoder_states.append(x)
            l_aux.append(l_aux_i)
        return self._result(
            self.final_output(x, features_only, part),
            encoder_embedding,
            encoder_padding_mask,
            encoder_states,
            l_aux,
        )

    @staticmethod
    def _result(
        encoder_out: Tensor,
        encoder_embedding: Tensor,
        encoder_padding_mask: Tensor,
        encoder_states: list,
        l_aux: list,
    ) -> dict:
        return {
            "encoder_out": encoder_out,
            "encoder_embedding": encoder_embedding,
            "encoder_padding_mask": encoder_padding_mask,
            "encoder_states": encoder_states,
            "l_aux": l_aux,
        }

    def _check_inputs(
        self, src_tokens: Optional[Tensor], token_embeddings: Optional[Tensor]
    ) -> tuple[int, int]:
        if src_tokens is None and token_embeddings is None:
            raise ValueError("src_tokens or token_embeddings must be given")
        if token_embeddings is not None:
            if token_embeddings.dim() != 3 or token_embeddings.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"token_embeddings must have shape (batch, length, embed_dim="
                    f"{self.embed_dim}), got {tuple(token_embeddings.shape)}"
                )
            shape = tuple(token_embeddings.shape[:2])
        else:
            shape = tuple(src_tokens.shape)
        if src_tokens is not None and (src_tokens.dim() != 2 or tuple(src_tokens.shape) != shape):
            raise ValueError(
                f"src_tokens must have shape (batch, length) = {shape}, got "
                f"{tuple(src_tokens.shape)}"
            )
        return shape
