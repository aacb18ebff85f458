"""The attention core's two paths side by side (magneto/attention_core.py): torch's SDPA and
the math path (two GEMMs around a float32 softmax), at decoding and prefill shapes, fp32 and
bf16, ``torch.no_grad``. What ``attention_core`` measures at first use, as a table: the ratio
is SDPA's time over the math path's (below 1: SDPA faster), the median of interleaved rounds.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = harness.cpu_timer(args.threads)
    print("# Attention core: SDPA / math path, torch.no_grad\n")
    print(f"{harness.cpu_model()}, {args.threads} threads, {timer.clock}, {args.rounds} rounds\n")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for b, h, q_len, k_len, d in SHAPES:
            q = torch.randn(b, h, q_len, d, dtype=dtype)
            k, v = (torch.randn(b, h, k_len, d, dtype=dtype) for _ in range(2))

            def run(path, q=q, k=k, v=v):
                with force_path(path), torch.no_grad():
                    attend(q, k, v)

            variants = {path: (lambda p=path: run(p)) for path in ("sdpa", "math")}
            times = harness.interleaved(variants, args.rounds, timer)
            ratio = harness.ratio_stats(times["sdpa"], times["math"])
            rows.append((str(dtype).removeprefix("torch."), f"{b}x{h}", q_len, k_len, str(ratio)))
    header = ("dtype", "batch x heads", "query rows", "keys", "SDPA / math")
    print("\n".join(harness.markdown_table(header, rows)))


if __name__ == "__main__":
    main()
