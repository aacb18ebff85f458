"""The attention core's paths side by side (magneto/attention_core.py): torch's SDPA, the math
path (two GEMMs around a float32 softmax) and, in bf16, SDPA on float32 copies ("widened"), at
decoding and prefill shapes, fp32 and bf16, ``torch.no_grad``; then training (forward and
backward, causal) at the report's layer shape and a longer one, SDPA against widened in bf16.
What ``attention_core`` measures at first use, as tables: each ratio is a path's time over
the math path's (training: over SDPA's; below 1: faster), the median of interleaved rounds.

    python -m bench.bench_attention [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from magneto.attention_core import attend, force_path
from magneto.report import harness

# (batch, heads, query rows, cached keys, head width): one and eight new tokens over a 256-token
# cache (the report's decode case), a 64-token chunk, and a training-size square
SHAPES = ((8, 12, 1, 257, 64), (1, 12, 1, 257, 64), (8, 12, 8, 264, 64), (8, 12, 64, 320, 64),
          (4, 12, 512, 512, 64))  # fmt: skip
# (batch, heads, tokens, head width) of a training step: the report's layer (4 x 256 tokens,
# d = 768) and twice its length
TRAINING_SHAPES = ((4, 12, 256, 64), (4, 12, 512, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = harness.cpu_timer(args.threads)
    print("# Attention core: each path / the math path, torch.no_grad\n")
    print(f"{harness.cpu_model()}, {args.threads} threads, {timer.clock}, {args.rounds} rounds\n")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        paths = ("sdpa", "math") + (("widened",) if dtype != torch.float32 else ())
        for b, h, q_len, k_len, d in SHAPES:
            q = torch.randn(b, h, q_len, d, dtype=dtype)
            k, v = (torch.randn(b, h, k_len, d, dtype=dtype) for _ in range(2))

            def run(path, q=q, k=k, v=v):
                with force_path(path), torch.no_grad():
                    attend(q, k, v)

            variants = {path: (lambda p=path: run(p)) for path in paths}
            times = harness.interleaved(variants, args.rounds, timer)
            ratios = [
                str(harness.ratio_stats(times[p], times["math"])) if p in times else "—"
                for p in ("sdpa", "widened")
            ]
            rows.append((str(dtype).removeprefix("torch."), f"{b}x{h}", q_len, k_len, *ratios))
    header = ("dtype", "batch x heads", "query rows", "keys", "SDPA / math", "widened / math")
    print("\n".join(harness.markdown_table(header, rows)))

    print("\n# Training: forward and backward, causal, bf16: widened / SDPA\n")
    rows = []
    for b, h, t, d in TRAINING_SHAPES:
        q, k, v = (torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")

        def step(path, q=q, k=k, v=v):
            with force_path(path):
                attend(q, k, v, causal=True).sum().backward()

        variants = {path: (lambda p=path: step(p)) for path in ("sdpa", "widened")}
        times = harness.interleaved(variants, args.rounds, timer)
        rows.append((f"{b}x{h}", t, str(harness.ratio_stats(times["widened"], times["sdpa"]))))
    print("\n".join(harness.markdown_table(("batch x heads", "tokens", "widened / SDPA"), rows)))


if __name__ == "__main__":
    main()
