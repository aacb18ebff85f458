"""Train a small Magneto vision Transformer (ViT / BEiT style) to classify generated images.

    python3 -m magneto.examples.image_classification --steps 150

The images need no download: each is a stripe pattern, horizontal, vertical, diagonal or
anti-diagonal (the four classes), with a random stripe period, phase and colour, plus noise.
A patch embedding with a class token, learned positions, a Sub-LN Magneto encoder and a
linear head on the class token (``magneto.VisionTransformer``) learn it in a few hundred
steps on a CPU. Prints the training loss and the accuracy on held-out images.
"""

from __future__ import annotations

import math

import torch

import magneto
from magneto.examples import classification

CLASSES = ("horizontal", "vertical", "diagonal", "anti-diagonal")


def stripe_images(count: int, size: int, generator: torch.Generator) -> tuple:
    """``(images (count, 3, size, size), labels (count,))``: one stripe orientation each."""
    labels = torch.randint(0, len(CLASSES), (count,), generator=generator)
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = coords[:, None], coords[None, :]
    directions = torch.stack(
        [rows.expand(size, size), cols.expand(size, size), rows + cols, rows - cols]
    )  # (classes, size, size)
    period = 3.0 + 5.0 * torch.rand(count, 1, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(count, 1, 1, generator=generator)
    wave = torch.sin(2 * math.pi * directions[labels] / period + phase)  # (count, size, size)
    colour = torch.rand(count, 3, 1, 1, generator=generator) + 0.2
    noise = 0.3 * torch.randn(count, 3, size, size, generator=generator)
    return wave[:, None] * colour + noise, labels


def main(argv=None) -> float:
    p = classification.arguments(__doc__, batch_size=32)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    config = magneto.vision_encoder_config(**classification.encoder_options(args))
    model = magneto.VisionTransformer(
        config, num_classes=len(CLASSES), img_size=args.img_size, patch_size=args.patch_size
    )

    def batch(count, generator):
        return stripe_images(count, args.img_size, generator)

    return classification.train_and_test(model, batch, args, CLASSES, held_out=512)


if __name__ == "__main__":
    main()
