"""What the two classification examples share: their common command-line options, the
training loop and the held-out accuracy. Each example brings its model and its generated data
(a function ``batch(count, generator) -> (*model inputs, labels)``)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def arguments(doc: str, batch_size: int) -> argparse.ArgumentParser:
    """The options of both examples; each adds the shape of its own data."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--width", type=int, default=64, help="embed_dim")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backend", default=None, help="magneto_kernels backend (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    return p


def encoder_options(args) -> dict:
    """The encoder config's arguments the common options give (a 4x wide feed-forward)."""
    return dict(
        embed_dim=args.width,
        num_heads=args.heads,
        ffn_dim=4 * args.width,
        layers=args.layers,
        backend=args.backend,
    )


def train_and_test(model, batch, args, classes: tuple, held_out: int) -> float:
    """Trains ``model`` for ``args.steps`` AdamW steps on fresh batches (drawn from a generator
    seeded ``args.seed + 1``), printing the loss, then returns (and prints) its accuracy on
    ``held_out`` examples drawn from a generator of their own."""
    data = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        *inputs, labels = batch(args.batch_size, data)
        loss = F.cross_entropy(model(*inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(args.steps // 10, 1) == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    model.eval()
    *inputs, labels = batch(held_out, torch.Generator().manual_seed(10**6))
    with torch.no_grad():
        accuracy = (model(*inputs).argmax(-1) == labels).float().mean().item()
    chance = 1 / len(classes)
    print(f"held-out accuracy {accuracy:.3f} ({len(classes)} classes, chance {chance:.2f})")
    return accuracy
