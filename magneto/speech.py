"""Speech input: convolutional subsampling of filterbank features, padding masks from lengths,
a speech encoder config and a speech encoder.

``ConvSubsampling`` is the front-end speech Transformers use (Speech-Transformer, ESPnet's
``Conv2dSubsampling``): the (frames, features) filterbank of an utterance is an image with one
channel; two 3x3 convolutions with stride 2, each followed by ReLU, cut both axes by 4; the
channels and remaining feature bins of each frame are flattened and projected to ``embed_dim``.
A frame count T becomes ``((T - 1) // 2 - 1) // 2`` (no padding: every output frame sees input
frames only from its own utterance, so padded frames never leak into valid ones).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from magneto.config import MagnetoConfig, encoder_only_config
from magneto.encoder import Encoder

MIN_FRAMES = 7  # the fewest input frames that give one output frame


def subsampled_length(frames):
    """Frames after the two stride-2 convolutions (int or integer Tensor)."""
    return ((frames - 1) // 2 - 1) // 2


def lengths_to_padding_mask(lengths: Tensor, max_length: int) -> Tensor:
    """(batch, max_length) bool, True at padding (positions >= the utterance's length)."""
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise ValueError(
            f"lengths must be a 1-D integer Tensor, got "
            f"{tuple(lengths.shape) if isinstance(lengths, Tensor) else lengths!r}"
        )
    if lengths.numel() and (int(lengths.max()) > max_length or int(lengths.min()) < 0):
        raise ValueError(
            f"lengths must be in [0, {max_length}] (the input's length), got {lengths.tolist()}"
        )
    return torch.arange(max_length, device=lengths.device)[None, :] >= lengths[:, None]


class ConvSubsampling(nn.Module):
    """(batch, frames, in_features) -> (batch, subsampled_length(frames), embed_dim)."""

    def __init__(self, in_features: int = 80, embed_dim: int = 512, channels: Optional[int] = None):
        super().__init__()
        channels = embed_dim if channels is None else channels
        for name, value in (
            ("in_features", in_features),
            ("embed_dim", embed_dim),
            ("channels", channels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        bins = subsampled_length(in_features)
        if bins < 1:
            raise ValueError(
                f"in_features must be >= {MIN_FRAMES} (two stride-2 3x3 "
                f"convolutions), got {in_features}"
            )
        self.in_features, self.embed_dim, self.channels = in_features, embed_dim, channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2),
            nn.ReLU(),
        )
        self.out = nn.Linear(channels * bins, embed_dim)

    def forward(
        self, features: Tensor, lengths: Optional[Tensor] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``(x, padding_mask)``: the subsampled frames and, when ``lengths`` (batch,) frame
        counts are given, the (batch, frames') mask, True at padding (else None)."""
        if not isinstance(features, Tensor) or features.dim() != 3:
            shape = (
                tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            )
            raise ValueError(f"features must be a (batch, frames, in_features) Tensor, got {shape}")
        batch, frames, width = features.shape
        if width != self.in_features:
            raise ValueError(f"feature width {width} does not match in_features={self.in_features}")
        if frames < MIN_FRAMES:
            raise ValueError(f"features need >= {MIN_FRAMES} frames, got {frames}")
        mask = None
        if lengths is not None:
            if tuple(lengths.shape) != (batch,):
                raise ValueError(
                    f"lengths must have shape (batch,) = ({batch},), got {tuple(lengths.shape)}"
                )
            if lengths.is_floating_point():
                raise ValueError("lengths must be an integer Tensor")
            if int(lengths.max()) > frames:
                raise ValueError(
                    f"lengths {lengths.tolist()} are longer than the input ({frames} frames)"
                )
            if int(lengths.min()) < MIN_FRAMES:
                raise ValueError(
                    f"lengths must be >= {MIN_FRAMES} frames (one output frame), "
                    f"got {lengths.tolist()}"
                )
        x = self.conv(features.unsqueeze(1))  # (batch, channels, frames', bins)
        x = self.out(x.transpose(1, 2).flatten(2))
        if lengths is not None:
            mask = lengths_to_padding_mask(subsampled_length(lengths), x.shape[1])
        return x, mask


def speech_encoder_config(
    embed_dim: int = 512,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    layers: int = 12,
    max_positions: int = 3000,
    **overrides,
) -> MagnetoConfig:
    """A Magneto encoder for subsampled speech frames (Speech-Transformer base shape by
    default): no vocabulary, sinusoidal positions for up to ``max_positions`` frames (after
    the 4x subsampling: 2 minutes of 10 ms frames), Sub-LN."""
    fields = {"positions": "sinusoidal", "max_positions": max_positions, **overrides}
    return encoder_only_config(embed_dim, num_heads, ffn_dim, layers, fields)


class SpeechEncoder(nn.Module):
    """``ConvSubsampling`` front-end and a Magneto encoder over its frames."""

    def __init__(
        self, config: MagnetoConfig, in_features: int = 80, channels: Optional[int] = None
    ):
        super().__init__()
        if config.vocab_size != 0:
            raise ValueError(f"vocab_size must be 0 for a speech encoder, got {config.vocab_size}")
        self.config = config
        self.subsample = ConvSubsampling(in_features, config.embed_dim, channels)
        self.encoder = Encoder(config)

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None, **kwargs) -> dict:
        """``features`` (batch, frames, in_features), ``lengths`` (batch,) valid frames; the
        encoder's result dict (``encoder_padding_mask`` in subsampled frames). ``kwargs`` go to
        the encoder (e.g. ``return_all_hiddens``)."""
        x, mask = self.subsample(features, lengths)
        return self.encoder(None, encoder_padding_mask=mask, token_embeddings=x, **kwargs)
