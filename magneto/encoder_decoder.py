"""Encoder-decoder Magneto model (torchscale 0.3.0's ``EncoderDecoder`` call and result)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from magneto.config import MagnetoConfig
from magneto.decoder import Decoder
from magneto.encoder import Encoder


class EncoderDecoder(nn.Module):
    """An ``Encoder`` and a ``Decoder`` with cross-attention; init gains use both depths.

    With ``config.share_all_embeddings`` the decoder reuses the encoder's token embedding (and,
    with ``share_input_output_embed``, so does the output projection).
    """

    def __init__(
        self,
        config: MagnetoConfig,
        encoder_embed_tokens: Optional[nn.Module] = None,
        encoder_embed_positions: Optional[nn.Module] = None,
        decoder_embed_tokens: Optional[nn.Module] = None,
        decoder_embed_positions: Optional[nn.Module] = None,
        output_projection: Optional[nn.Module] = None,
        **kwargs,
    ):
        super().__init__()
        if not isinstance(config, MagnetoConfig):
            raise ValueError(f"config must be a MagnetoConfig, got {type(config).__name__}")
        if config.share_all_embeddings and not config.share_input_output_embed:
            config = config.replace(share_input_output_embed=True)
        self.config = self.args = config
        self.encoder = Encoder(
            config, encoder_embed_tokens, encoder_embed_positions, is_encoder_decoder=True, **kwargs
        )
        if config.share_all_embeddings and decoder_embed_tokens is None:
            decoder_embed_tokens = self.encoder.embed_tokens
        self.decoder = Decoder(
            config,
            decoder_embed_tokens,
            decoder_embed_positions,
            output_projection,
            is_encoder_decoder=True,
            **kwargs,
        )

    def forward(
        self,
        src_tokens: Optional[Tensor],
        prev_output_tokens: Optional[Tensor],
        return_all_hiddens: bool = False,
        features_only: bool = False,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[dict] = None,
        **kwargs,
    ) -> tuple[Tensor, dict]:
        """Encode ``src_tokens``, decode ``prev_output_tokens``; returns the decoder's result.

        Beyond torchscale's call (whose extra keyword arguments are ignored, as there):
        ``encoder_padding_mask`` reaches the encoder, ``incremental_state`` the decoder.
        """
        encoder_out = self.encoder(
            src_tokens,
            encoder_padding_mask=encoder_padding_mask,
            return_all_hiddens=return_all_hiddens,
        )
        return self.decoder(
            prev_output_tokens,
            encoder_out=encoder_out,
            incremental_state=incremental_state,
            features_only=features_only,
            return_all_hiddens=return_all_hiddens,
        )
