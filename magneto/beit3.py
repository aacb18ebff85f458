"""BEiT-3 (Wang et al. 2022, "Image as a Foreign Language"): one multiway Magneto encoder for
images, text and image-text pairs, the twin of torchscale 0.3.0's ``torchscale.model.BEiT3``.

Same submodules and parameter names as torchscale (``text_embed``, ``vision_embed``,
``encoder.embed_positions.A`` for image positions, ``.B`` for text positions, the multiway
encoder layers; q/k/v packed per part, see ``magneto.multiway``), so public BEiT-3 state dicts
load directly; same forward call and result. The image tokens come first: with both inputs,
``multiway_split_position`` is the number of image tokens (patches + class token).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from magneto.config import MagnetoConfig
from magneto.embeddings import LearnedPositionalEmbedding, TokenEmbedding, build_output_projection
from magneto.encoder import Encoder
from magneto.init import init_learned_positions_, init_output_projection_, init_token_embedding_
from magneto.multiway import Multiway
from magneto.vision import PatchEmbedding


def _positions(tokens: int, embed_dim: int, scheme: str) -> LearnedPositionalEmbedding:
    """Learned positions for ``tokens`` tokens, in torchscale's layout (ids start at 2)."""
    rows = tokens + LearnedPositionalEmbedding.OFFSET
    table = LearnedPositionalEmbedding(rows, embed_dim, _weight=torch.empty(rows, embed_dim))
    init_learned_positions_(table, scheme)  # the only draw: torchscale's order, seed for seed
    return table


class BEiT3(nn.Module):
    """Multiway encoder over image patches (part A) and text tokens (part B).

    ``config``: ``multiway=True``, ``vocab_size`` > 0 (the text vocabulary; also the output
    projection's width unless ``output_projection=False``), ``max_positions`` text tokens.
    ``img_size``/``patch_size``/``in_chans``: the image geometry (torchscale's ``args``).
    Built in torchscale's order, so with ``init="torchscale"`` the same seed gives
    torchscale's parameters.
    """

    def __init__(
        self, config: MagnetoConfig, img_size: int = 224, patch_size: int = 16, in_chans: int = 3
    ):
        super().__init__()
        if not isinstance(config, MagnetoConfig):
            raise ValueError(f"config must be a MagnetoConfig, got {type(config).__name__}")
        if not config.multiway:
            raise ValueError("multiway must be True for BEiT3")
        if config.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 for BEiT3's text, got {config.vocab_size}")
        if config.share_input_output_embed or config.share_all_embeddings:
            raise ValueError("share_input_output_embed: BEiT3's output projection is not tied")
        self.config = self.args = config
        d = config.embed_dim
        self.text_embed = TokenEmbedding(
            config.vocab_size,
            d,
            padding_idx=config.padding_idx,
            _weight=torch.empty(config.vocab_size, d),
        )
        init_token_embedding_(self.text_embed)
        self.vision_embed = PatchEmbedding(
            img_size, patch_size, in_chans, d, mask_token=True, cls_token=True
        )
        positions = Multiway(
            _positions(self.vision_embed.num_position_embeddings(), d, config.init),
            _positions(config.max_positions, d, config.init),
        )
        projection = None
        if config.output_projection:
            projection = build_output_projection(config)
            init_output_projection_(projection, config.init)
        # The encoder embeds nothing itself: BEiT3 hands it the token embeddings.
        self.encoder = Encoder(
            config.replace(vocab_size=0, positions="none"),
            embed_positions=positions,
            output_projection=projection,
        )

    def forward(
        self,
        textual_tokens: Optional[Tensor] = None,
        visual_tokens: Optional[Tensor] = None,
        text_padding_position: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        vision_masked_position: Optional[Tensor] = None,
        incremental_state: Optional[list] = None,
        positions: Optional[Tensor] = None,
    ) -> dict:
        """torchscale's call: the encoder's result dict plus ``"multiway_split_position"``.

        ``textual_tokens`` (batch, text length) ids; ``visual_tokens`` (batch, in_chans,
        img_size, img_size) images; ``text_padding_position`` (batch, text length), True at
        padding; ``vision_masked_position`` (batch, patches), patches replaced by the mask token.
        """
        if textual_tokens is None and visual_tokens is None:
            raise ValueError("textual_tokens or visual_tokens must be given")
        if textual_tokens is not None:
            if not isinstance(textual_tokens, Tensor) or textual_tokens.dim() != 2:
                shape = (
                    tuple(textual_tokens.shape)
                    if isinstance(textual_tokens, Tensor)
                    else type(textual_tokens).__name__
                )
                raise ValueError(f"textual_tokens must be a (batch, length) Tensor, got {shape}")
            if text_padding_position is not None and tuple(text_padding_position.shape) != tuple(
                textual_tokens.shape
            ):
                raise ValueError(
                    f"text_padding_position must have the shape of textual_tokens "
                    f"{tuple(textual_tokens.shape)}, got "
                    f"{tuple(text_padding_position.shape)}"
                )
        elif text_padding_position is not None:
            raise ValueError("text_padding_position needs textual_tokens")
        if visual_tokens is None and vision_masked_position is not None:
            raise ValueError("vision_masked_position needs visual_tokens")

        padding_mask = None
        if textual_tokens is None:
            x = self.vision_embed(visual_tokens, vision_masked_position)
            split = -1
        elif visual_tokens is None:
            x = self.text_embed(textual_tokens)
            padding_mask = text_padding_position
            split = 0
        else:
            image = self.vision_embed(visual_tokens, vision_masked_position)
            if image.shape[0] != textual_tokens.shape[0]:
                raise ValueError(
                    f"visual_tokens and textual_tokens must share the batch size, "
                    f"got {image.shape[0]} and {textual_tokens.shape[0]}"
                )
            split = image.shape[1]
            x = torch.cat([image, self.text_embed(textual_tokens)], dim=1)
            if text_padding_position is not None:
                image_pad = torch.zeros(image.shape[:-1], dtype=torch.bool, device=image.device)
                padding_mask = torch.cat([image_pad, text_padding_position.to(torch.bool)], dim=1)
        out = self.encoder(
            None,
            encoder_padding_mask=padding_mask,
            attn_mask=attn_mask,
            token_embeddings=x,
            multiway_split_position=split,
            incremental_state=incremental_state,
            positions=positions,
        )
        out["multiway_split_position"] = split
        return out
