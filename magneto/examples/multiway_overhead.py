"""Time one multiway encoder layer against the plain layer, forward + backward.

    python3 -m magneto.examples.multiway_overhead --dim 768 --length 256 --split 197 --threads 1

Variants, interleaved round by round in a rotating order (so a load change on the machine
hits all alike):

- ``plain``: the non-multiway layer;
- ``single``: the multiway layer with every token in one part (split -1): the plain path with
  copy A's weights, expected at ratio 1;
- ``parts``: the multiway layer on a sequence held as two parts (``forward_parts``: what every
  layer of a multiway encoder runs), per-part fused ops, one q/k/v concatenation, attention per
  query part;
- ``split``: ``layer(x, multiway_split_position=split)`` on a whole tensor: ``parts`` plus the
  copy into parts and the concatenation of the output (an encoder does these once, not per
  layer).

Prints the median time of each and its ratio to ``plain``'s median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import magneto


def _step(run, inputs):
    for t in inputs:
        t.grad = None
    out = run()
    out = torch.cat(out, dim=1) if isinstance(out, list) else out
    out.backward(torch.ones_like(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--split", type=int, default=197, help="image tokens (BEiT-3: 196 + 1)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default=None, help="magneto_kernels backend (default: auto)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; 1 on a loaded machine, where a parallel op waits "
        "for its threads to be scheduled, a cost per call, not per row",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = magneto.MagnetoConfig(
        embed_dim=args.dim,
        num_heads=args.heads,
        ffn_dim=4 * args.dim,
        encoder_layers=12,
        backend=args.backend,
    )
    plain = magneto.EncoderLayer(config).train()
    multiway = magneto.EncoderLayer(config.replace(multiway=True)).train()
    x = torch.randn(args.batch, args.length, args.dim, requires_grad=True)
    parts = [
        x[:, : args.split].detach().clone().requires_grad_(),
        x[:, args.split :].detach().clone().requires_grad_(),
    ]
    variants = {
        "plain": (lambda: plain(x)[0], [x]),
        "single": (lambda: multiway(x, multiway_split_position=-1)[0], [x]),
        "parts": (lambda: multiway.forward_parts(parts), parts),
        "split": (lambda: multiway(x, multiway_split_position=args.split)[0], [x]),
    }
    times = {name: [] for name in variants}
    for run, inputs in variants.values():  # warm-up
        _step(run, inputs)
    names = list(variants)
    for round_ in range(args.rounds):
        # rotate the order, so no variant always runs right after the same other one
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            run, inputs = variants[name]
            start = time.perf_counter()
            _step(run, inputs)
            times[name].append(time.perf_counter() - start)
    load = os.getloadavg()
    print(
        f"d={args.dim} heads={args.heads} batch={args.batch} length={args.length} "
        f"split={args.split} rounds={args.rounds} threads={torch.get_num_threads()} "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    base = statistics.median(times["plain"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"{name:>7}: median {median * 1e3:8.2f} ms  ratio {median / base:.3f}  "
            f"(min {min(samples) * 1e3:.2f} ms)"
        )


if __name__ == "__main__":
    main()
