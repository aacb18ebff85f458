"""Vision input: the patch embedding (ViT / BEiT), a vision encoder config and an image classifier.

``PatchEmbedding`` is torchscale 0.3.0's ``VisionEmbedding`` (same parameters and names:
``proj`` the patchifying convolution, ``cls_token``, ``mask_token``), with checked inputs. An
image (batch, channels, H, W) becomes (batch, [1 +] patches, d): a ``patch_size`` convolution
with stride ``patch_size``, patches in row-major order, masked patches (masked image
modelling) replaced by ``mask_token``, then ``cls_token`` prepended.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from magneto.config import MagnetoConfig, encoder_only_config
from magneto.embeddings import LearnedPositionalEmbedding
from magneto.encoder import Encoder
from magneto.init import init_learned_positions_


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class PatchEmbedding(nn.Module):
    """Square images of ``img_size`` pixels cut into ``patch_size`` patches, each projected to
    ``embed_dim`` (torchscale's ``VisionEmbedding``; ``mask_token``/``cls_token`` its
    ``contain_mask_token``/``prepend_cls_token``, both zero-initialised as there)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        mask_token: bool = False,
        cls_token: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
        ):
            _positive(name, value)
        if patch_size > img_size:
            raise ValueError(f"patch_size={patch_size} must be <= img_size={img_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None

    def num_position_embeddings(self) -> int:
        """Tokens per image: the patches, plus the class token."""
        return self.num_patches + (self.cls_token is not None)

    def forward(self, x: Tensor, masked_position: Optional[Tensor] = None, **kwargs) -> Tensor:
        """(batch, in_chans, img_size, img_size) images -> (batch, tokens, embed_dim).

        ``masked_position`` (batch, num_patches), bool or 0/1: patches replaced by
        ``mask_token`` (needs ``mask_token=True``).
        """
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"images must be a (batch, channels, height, width) Tensor, got {shape}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"images have {x.shape[1]} channels, the patch embedding expects "
                f"in_chans={self.in_chans}"
            )
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"image size {tuple(x.shape[2:])} does not match img_size={self.img_size}"
            )
        x = self.proj(x).flatten(2).transpose(1, 2)
        if masked_position is not None:
            if self.mask_token is None:
                raise ValueError("masked_position needs a patch embedding with mask_token=True")
            if tuple(masked_position.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"masked_position must have shape (batch, num_patches) = "
                    f"{tuple(x.shape[:2])}, got {tuple(masked_position.shape)}"
                )
            w = masked_position.unsqueeze(-1).type_as(x)
            x = x * (1 - w) + self.mask_token * w
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size[0]}, patch_size={self.patch_size[0]}, "
            f"in_chans={self.in_chans}, num_patches={self.num_patches}"
        )


def vision_encoder_config(
    embed_dim: int = 768, num_heads: int = 12, ffn_dim: int = 3072, layers: int = 12, **overrides
) -> MagnetoConfig:
    """A Magneto encoder for patch tokens (ViT-Base shape by default): no vocabulary, positions
    added by the model that owns the patch embedding (``VisionTransformer``), Sub-LN."""
    return encoder_only_config(
        embed_dim, num_heads, ffn_dim, layers, {"positions": "none", **overrides}
    )


class VisionTransformer(nn.Module):
    """Image classifier (ViT / BEiT style): patch embedding with a class token, learned
    positions, a Magneto encoder and a linear head on the class token's final state."""

    def __init__(
        self,
        config: MagnetoConfig,
        num_classes: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
    ):
        super().__init__()
        _positive("num_classes", num_classes)
        if config.vocab_size != 0:
            raise ValueError(f"vocab_size must be 0 for a vision encoder, got {config.vocab_size}")
        self.config = config
        self.patch_embed = PatchEmbedding(
            img_size, patch_size, in_chans, config.embed_dim, cls_token=True
        )
        # torchscale's layout: two unused rows in front (position ids start at 2).
        rows = self.patch_embed.num_position_embeddings() + LearnedPositionalEmbedding.OFFSET
        positions = LearnedPositionalEmbedding(
            rows, config.embed_dim, _weight=torch.empty(rows, config.embed_dim)
        )
        init_learned_positions_(positions, config.init)
        self.encoder = Encoder(config.replace(positions="none"), embed_positions=positions)
        self.head = nn.Linear(config.embed_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """(batch, in_chans, img_size, img_size) -> class logits (batch, num_classes)."""
        x = self.patch_embed(images)
        features = self.encoder(None, token_embeddings=x)["encoder_out"]
        return self.head(features[:, 0])
