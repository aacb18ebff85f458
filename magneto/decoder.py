"""The Magneto decoder: embeddings, a stack of ``DecoderLayer``, final norm, output projection.

Same constructor arguments, forward call, result and ``incremental_state`` format as torchscale
0.3.0's ``Decoder``: ``incremental_state`` is a dict with one dict per layer index holding
``prev_key``/``prev_value`` (batch, heads, length, head_dim), plus an optional
``"is_first_step"`` flag. Without the flag each call feeds the whole prefix as
``prev_output_tokens`` and only its last token is computed; with it the whole prefix is
computed (causally) and cached. Unlike torchscale, each layer's ``prev_key``/``prev_value`` are
views of buffers with room after them, which later steps write into instead of copying the
cache (``magneto.kv_cache.KVRoom``; without gradients), and cross-attention projects the
encoder output to keys and values once per sequence, keeping them in the layer's state under
``"encoder_attn"`` (torchscale recomputes them at every step).

torchscale's options (``magneto.config``): ``layernorm_embedding`` (the new row only, when
decoding), relative position tables (``self_attn_relative_position``, and
``cross_attn_relative_position`` in an encoder-decoder: each bias computed once per forward for
the rows it computes, a decoding step's the last query row, where torchscale's own decoding
slices the wrong dimension and fails), xPos, mixture-of-experts layers (their ``l_aux`` in the
result), multiway attention (copy A).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from magneto.config import MagnetoConfig
from magneto.layers import DecoderLayer
from magneto.relative_position import RelativePositionBias
from magneto.stack import Stack


class Decoder(Stack):
    """Magneto (or Pre-LN / Post-LN / DeepNorm) decoder; arguments as ``magneto.Encoder``."""

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
            DecoderLayer,
            config.decoder_layers,
            want_projection=True,
            final_norm=config.normalize_before,
            **kwargs,
        )
        self.self_attn_relative_position = self.relative_positions()
        self.cross_attn_relative_position = (
            self.relative_positions() if is_encoder_decoder else None
        )

    def relative_position_tables(self) -> list[RelativePositionBias]:
        tables = (self.self_attn_relative_position, self.cross_attn_relative_position)
        return [t for t in tables if t is not None]

    @staticmethod
    def is_first_step(incremental_state: Optional[dict]) -> bool:
        return incremental_state is not None and bool(incremental_state.get("is_first_step", False))

    def forward_embedding(
        self,
        tokens: Optional[Tensor],
        token_embedding: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
    ) -> tuple[Tensor, Tensor]:
        positions = None
        if self.embed_positions is not None:
            source = tokens if tokens is not None else token_embedding
            positions = self.embed_positions(source, incremental_state=incremental_state)
        if incremental_state is not None and not self.is_first_step(incremental_state):
            tokens = tokens[:, -1:] if tokens is not None else None
            positions = positions[:, -1:] if positions is not None else None
        embed = self.scaled_token_embedding(tokens, token_embedding)
        return self.embedding_output(embed, positions), embed

    def forward(
        self,
        prev_output_tokens: Optional[Tensor],
        self_attn_padding_mask: Optional[Tensor] = None,
        encoder_out: Optional[dict] = None,
        incremental_state: Optional[dict] = None,
        features_only: bool = False,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        **kwargs,
    ) -> tuple[Tensor, dict]:
        """torchscale's call and result: ``(x, {"inner_states", "l_aux", "attn": None})``.

        ``prev_output_tokens`` (batch, length) and/or ``token_embeddings`` (batch, length, d);
        ``self_attn_padding_mask`` (batch, keys so far), True at padding; ``encoder_out``: an
        ``Encoder`` result (uses ``encoder_out`` and ``encoder_padding_mask``).
        """
        self._check_inputs(prev_output_tokens, token_embeddings)
        x, _ = self.forward_embedding(prev_output_tokens, token_embeddings, incremental_state)
        first_step = self.is_first_step(incremental_state)
        causal = incremental_state is None or first_step
        inner_states = [x]
        l_aux = [] if encoder_out is None else list(encoder_out.get("l_aux", []))
        enc = None if encoder_out is None else encoder_out["encoder_out"]
        enc_mask = None if encoder_out is None else encoder_out.get("encoder_padding_mask")
        # x holds the last rows of the prefix: the biases' query rows start at ``step``
        length = (prev_output_tokens if prev_output_tokens is not None else token_embeddings).shape[
            1
        ]
        rows, step = x.shape[1], length - x.shape[1]
        self_rel_pos = cross_rel_pos = None
        if self.self_attn_relative_position is not None:
            self_rel_pos = self.self_attn_relative_position.bias(rows, length, step)
        if self.cross_attn_relative_position is not None and enc is not None:
            cross_rel_pos = self.cross_attn_relative_position.bias(rows, enc.shape[1], step)
        for idx, layer in enumerate(self.layers):
            state = None
            if incremental_state is not None:
                state = incremental_state.setdefault(idx, {})
            x, _, _, l_aux_i = self.run_layer(
                layer,
                x,
                enc,
                enc_mask,
                incremental_state=state,
                self_attn_padding_mask=self_attn_padding_mask,
                self_attn_rel_pos=self_rel_pos,
                cross_attn_rel_pos=cross_rel_pos,
                is_first_step=first_step,
                self_attn_causal=causal,
            )
            l_aux.append(l_aux_i)
            inner_states.append(x)
        return self.final_output(x, features_only), {
            "inner_states": inner_states,
            "l_aux": l_aux,
            "attn": None,
        }

    def output_layer(self, features: Tensor) -> Tensor:
        return self.output_projection(features)

    def _check_inputs(self, tokens: Optional[Tensor], token_embeddings: Optional[Tensor]) -> None:
        if tokens is None and token_embeddings is None:
            raise ValueError("prev_output_tokens or token_embeddings must be given")
        if tokens is not None and tokens.dim() != 2:
            raise ValueError(
                f"prev_output_tokens must have shape (batch, length), got {tuple(tokens.shape)}"
            )
        if token_embeddings is not None and (
            token_embeddings.dim() != 3 or token_embeddings.shape[-1] != self.embed_dim
        ):
            raise ValueError(
                f"token_embeddings must have shape (batch, length, embed_dim="
                f"{self.embed_dim}), got {tuple(token_embeddings.shape)}"
            )
