"""Train a small Magneto speech encoder to classify generated filterbank utterances.

    python3 -m magneto.examples.speech_classification --steps 150

The utterances need no download: log-mel-like (frames, bins) features of random length
holding one energy band that rises, falls, stays flat or alternates between two bins (the
four classes), over noise, padded to the longest utterance of the batch. The front-end
(``magneto.ConvSubsampling``: two stride-2 convolutions) cuts the frames by 4, the padding mask
comes from the lengths, a Sub-LN Magneto encoder runs over the frames, and a linear head reads
the mean of the valid frames. Prints the training loss and the held-out accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

import magneto
from magneto.examples import classification

CLASSES = ("rising", "falling", "flat", "alternating")


def utterances(count: int, bins: int, max_frames: int, generator: torch.Generator) -> tuple:
    """``(features (count, max_frames, bins), lengths (count,), labels (count,))``."""
    labels = torch.randint(0, len(CLASSES), (count,), generator=generator)
    lengths = torch.randint(max_frames // 2, max_frames + 1, (count,), generator=generator)
    features = 0.5 * torch.randn(count, max_frames, bins, generator=generator)
    start = torch.randint(bins // 4, 3 * bins // 4, (count,), generator=generator)
    for i in range(count):
        t = torch.arange(int(lengths[i]))
        frac = t / max(int(lengths[i]) - 1, 1)
        offset = {0: frac * bins / 4, 1: -frac * bins / 4, 2: 0 * frac, 3: (t // 8 % 2) * bins / 4}[
            int(labels[i])
        ]
        band = (start[i] + offset).long().clamp(0, bins - 1)
        features[i, t, band] += 3.0
        features[i, int(lengths[i]) :] = 0.0  # padding
    return features, lengths, labels


class Classifier(nn.Module):
    def __init__(self, encoder: magneto.SpeechEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.embed_dim, num_classes)

    def forward(self, features, lengths):
        out = self.encoder(features, lengths)
        valid = (~out["encoder_padding_mask"]).unsqueeze(-1).type_as(out["encoder_out"])
        pooled = (out["encoder_out"] * valid).sum(1) / valid.sum(1)
        return self.head(pooled)


def main(argv=None) -> float:
    p = classification.arguments(__doc__, batch_size=16)
    p.add_argument("--bins", type=int, default=40, help="filterbank features per frame")
    p.add_argument("--max-frames", type=int, default=96)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    options = classification.encoder_options(args)
    config = magneto.speech_encoder_config(**options, max_positions=args.max_frames)
    model = Classifier(
        magneto.SpeechEncoder(config, in_features=args.bins, channels=32), len(CLASSES)
    )

    def batch(count, generator):
        return utterances(count, args.bins, args.max_frames, generator)

    return classification.train_and_test(model, batch, args, CLASSES, held_out=256)


if __name__ == "__main__":
    main()
