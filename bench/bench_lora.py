"""Is a LoRA projection worth fusing? One norm-then-LoRA-Linear projection, forward+backward.

A PEFT LoRA layer computes ``base(h) + B(A(h))·s`` with h = norm(x). magneto runs it unfused
(``magneto.fusion``: the norm module, then the LoRA module). The fused alternative would run
the base projection as ``ln_linear(x, norm, W, b, residual=B(A(norm(x)))·s)``: the low-rank
term still needs h, so the norm runs twice, and the op only saves the separate add.

Variants, timed side by side in interleaved rounds (``magneto.report.harness``), base weight
frozen and the adapter trained, as in LoRA fine-tuning:

- ``unfused``: what magneto runs, ``lora(norm(x))`` (the formula of PEFT's ``lora.Linear``);
- ``fused``: ``ln_linear(x, norm, W, b, residual=lora_B(lora_A(norm(x)))·s)``;
- ``no adapter``: ``ln_linear(x, norm, W, b)``, the fused projection alone, for scale.

    python bench/bench_lora.py [--rows 1024 --dim 768 --out 3072 --rank 16 --rounds 15]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import magneto_kernels as mk
from magneto.norm import NormLayer
from magneto.report.harness import cpu_timer, interleaved, ratio_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--out", type=int, default=3072)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    norm = NormLayer(args.dim)
    base = nn.Linear(args.dim, args.out).requires_grad_(False)
    a = nn.Linear(args.dim, args.rank, bias=False)  # PEFT's lora_A, lora_B and scaling
    b = nn.Linear(args.rank, args.out, bias=False)
    nn.init.normal_(b.weight, std=0.02)
    s = 2.0

    def lora(h):  # PEFT's lora.Linear.forward without dropout
        return base(h) + b(a(h)) * s

    x = torch.randn(args.rows, args.dim, requires_grad=True)
    dy = torch.randn(args.rows, args.out)

    def fused():
        low_rank = b(a(norm(x))) * s
        return mk.ln_linear(x, norm.weight, norm.bias, base.weight, base.bias, residual=low_rank)

    forwards = {
        "unfused": lambda: lora(norm(x)),
        "fused": fused,
        "no adapter": lambda: mk.ln_linear(x, norm.weight, norm.bias, base.weight, base.bias),
    }
    torch.testing.assert_close(forwards["fused"](), forwards["unfused"]())

    def step(forward):
        return lambda: forward().backward(dy)

    times = interleaved({k: step(f) for k, f in forwards.items()}, args.rounds, cpu_timer())
    print(
        f"fwd+bwd, {args.rows} rows, {args.dim} -> {args.out}, rank {args.rank}, "
        f"{args.threads} thread(s), backend {mk.resolve_backend(None, x)}, {args.rounds} rounds"
    )
    for name in ("fused", "no adapter"):
        print(f"time({name}) / time(unfused): {ratio_stats(times[name], times['unfused'])}")


if __name__ == "__main__":
    main()
