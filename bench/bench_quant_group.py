"""BitNet b1.58 2B-4T's grouped projections, offline ("bitnet_offline"), bf16: one quantised
``ln_linear_group`` (the row normalised and quantised once) against one quantised ``ln_linear``
per weight (the row normalised and quantised again for each), on the cpu backend. q/k/v is
RMSNorm 2560 -> (2560, 640, 640), gate/up 2560 -> (6912, 6912); 1, 8 and 128 rows; random
ternary weights and non-zero-mean inputs. The two variants run alternately in every round
(``bench_bitnet._median_us``); the ratio is group / per-weight time (below 1: the group is
faster). Outputs are checked equal (bit for bit) before timing.

    python -m bench.bench_quant_group [--threads 1] [--rows 1 8 128] [--rounds 7] [--min-time 1]
"""

from __future__ import annotations

import argparse
import os

import torch

import magneto_kernels
from bench.bench_bitnet import HIDDEN, INTER, _median_us
from magneto_kernels import quant

GROUPS = {"qkv": (HIDDEN, HIDDEN // 4, HIDDEN // 4), "gate_up": (INTER, INTER)}
EPS = 1e-6


def _case(rows: int, out_features, gen):
    x = (torch.randn(rows, HIDDEN, generator=gen) * 1.2 + 0.3).to(torch.bfloat16)
    ln_weight = (torch.randn(HIDDEN, generator=gen) * 0.2 + 1.0).to(torch.bfloat16)
    weights = [
        quant.pack(torch.randint(-1, 2, (n, HIDDEN), generator=gen).float()) for n in out_features
    ]
    scales = torch.rand(len(out_features), generator=gen).to(torch.bfloat16) + 0.5
    return x, ln_weight, weights, scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.1f}, cpu backend, bf16, offline")
    print("| group | rows | group µs | per weight µs | group / per weight |")
    print("|---|---|---|---|---|")
    for name, out_features in GROUPS.items():
        for rows in args.rows:
            x, ln_weight, weights, scales = _case(rows, out_features, gen)

            def group(x=x, ln_weight=ln_weight, weights=weights, scales=scales):
                return magneto_kernels.ln_linear_group(
                    x, ln_weight, None, weights, eps=EPS, norm="rms", quant="bitnet_offline",
                    weight_scales=scales, backend="cpu",
                )  # fmt: skip

            def each(x=x, ln_weight=ln_weight, weights=weights, scales=scales):
                return tuple(
                    magneto_kernels.ln_linear(
                        x,
                        ln_weight,
                        None,
                        w,
                        eps=EPS,
                        norm="rms",
                        quant="bitnet_offline",
                        weight_scale=scales[i : i + 1],
                        backend="cpu",
                    )
                    for i, w in enumerate(weights)
                )

            with torch.inference_mode():
                assert all(torch.equal(g, e) for g, e in zip(group(), each()))
                t = _median_us({"group": group, "each": each}, args.rounds, args.min_time)
            ratio = t["group"] / t["each"]
            print(f"| {name} | {rows} | {t['group']:.0f} | {t['each']:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
