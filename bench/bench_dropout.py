"""The activation dropout outside the fused ops (``magneto_kernels.dropout``): the ``dropout`` op's
kernel against the reference's int64 Philox (what ``dropout`` ran before it had a kernel), forward
plus backward, side by side in one run, interleaved, median of ``--rounds`` (docs/design.md,
Decisions). Usage:

    python3 -m bench.bench_dropout [--backend cpu] [--threads 1] [--rounds 15]
"""

import argparse
import statistics
import time

import torch

import magneto_kernels as mk
from magneto_kernels import reference

SIZES = [(64, 1024), (512, 4096), (2048, 4096)]
P = 0.1


def _step(fn, x, dy):
    x.grad = None
    fn(x).backward(dy)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed = torch.tensor(12345, dtype=torch.int64)
    runs = {
        "reference (int64 Philox)": lambda x: reference.dropout(x, P, seed),
        f"dropout op ({args.backend})": lambda x: mk.dropout(x, P, backend=args.backend),
    }
    print(f"fwd+bwd, p={P}, {args.threads} thread(s), median of {args.rounds}, ms")
    print("| shape | dtype | " + " | ".join(runs) + " | ratio |")
    print("|---|---|" + "---|" * (len(runs) + 1))
    for shape in SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(*shape, dtype=dtype).requires_grad_()
            dy = torch.randn(*shape, dtype=dtype)
            times = {name: [] for name in runs}
            for fn in runs.values():
                _step(fn, x, dy)  # warm up
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    _step(fn, x, dy)
                    times[name].append(time.perf_counter() - start)
            ms = [statistics.median(t) * 1e3 for t in times.values()]
            cells = " | ".join(f"{m:.3f}" for m in ms)
            print(f"| {shape[0]}x{shape[1]} | {str(dtype)[6:]} | {cells} | {ms[0] / ms[1]:.1f} |")


if __name__ == "__main__":
    main()
