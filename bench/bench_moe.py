"""magneto's MoE layer (``magneto.moe``) against torchscale 0.3.0's ``MOELayer`` with the same
parameters and tokens, on CPU, one thread: the time of a training step (forward and backward,
top-2 gating, training capacity) and of an eval forward (eval capacity), as the median of
per-round ratios over interleaved rounds (``magneto.report.harness``).

torchscale multiplies dense (E·C, S) dispatch and (S, E·C) combine matrices into the tokens;
magneto gathers each expert's tokens and adds the weighted outputs back. torchscale's layer
needs torch.distributed (a one-process gloo group here) and, on CPU, a float histogram in its
gating's logging (``torch.histc`` of int64 is CUDA-only), as tests/test_moe.py gives it.

    python -m bench.bench_moe [--rounds 11] [--out bench/results/moe-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist

from magneto.compat import timm_standin
from magneto.report import harness

SIZES = ((256, 1024, 8, 2048), (512, 2048, 16, 4096))  # d, ffn, experts, tokens


def layers(d: int, ffn: int, experts: int):
    timm_standin.use_if_missing()
    from torchscale.architecture.config import EncoderConfig
    from torchscale.component.feedforward_network import make_experts
    from torchscale.component.xmoe.moe_layer import MOELayer
    from torchscale.component.xmoe.routing import Top2Gate

    from magneto import FeedForward, MagnetoConfig
    from magneto.moe import MoELayer, build_experts
    from magneto.moe_gate import Gate

    args = EncoderConfig(
        encoder_embed_dim=d, encoder_ffn_embed_dim=ffn, moe_freq=1, moe_expert_count=experts
    )
    torch.manual_seed(0)
    gate = Top2Gate(d, experts, args.moe_gating_use_fp32, args.moe_second_expert_policy)
    theirs = MOELayer(gate, make_experts(args, d, ffn), args)
    config = MagnetoConfig(embed_dim=d, num_heads=1, ffn_dim=ffn, encoder_layers=1)
    ours = MoELayer(Gate(d, experts, 2), build_experts(lambda: FeedForward(config), range(experts)))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def variants(layer, x: torch.Tensor, training: bool):
    layer.train(training)
    x = x.detach().requires_grad_(training)

    def step():
        torch.manual_seed(0)  # the same second-expert draws every call
        y, l_aux = layer(x)
        if training:
            (y.square().mean() + l_aux).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    histc = torch.histc
    torch.histc = lambda x, *a, **k: histc(x.float(), *a, **k)
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    timer = harness.cpu_timer(1)
    rows = []
    for d, ffn, experts, tokens in SIZES:
        ours, theirs = layers(d, ffn, experts)
        x = torch.randn(tokens // 512, 512, d)
        for training in (True, False):
            times = harness.interleaved(
                {
                    "magneto": variants(ours, x, training),
                    "torchscale": variants(theirs, x, training),
                },
                cli.rounds,
                timer,
            )
            ratio = harness.ratio_stats(times["magneto"], times["torchscale"])
            mode = "fwd+bwd (train capacity)" if training else "fwd (eval capacity)"
            ms = harness.time_stats(times["magneto"])["median_s"] * 1e3
            rows.append(
                (f"d={d}, ffn={ffn}, {experts} experts, {tokens} tokens", mode, f"{ms:.1f}", ratio)
            )
    dist.destroy_process_group()
    lines = [
        f"MoE layer, top-2, fp32, 1 thread, {cli.rounds} interleaved rounds, process CPU time "
        f"({harness.cpu_model()}); time(magneto) / time(torchscale), median (min–max):",
        "",
        *harness.markdown_table(("size", "pass", "magneto ms", "/ torchscale"), rows),
        "",
        "Command: `python -m bench.bench_moe`",
    ]
    print("\n".join(lines))
    if cli.out:
        with open(cli.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
