"""The mixture-of-experts half of a Sub-LN layer, ``x + moe(LN(x))``, magneto's against torchscale
0.3.0's (``final_layer_norm`` then ``MOELayer``) with the same parameters and tokens, on CPU,
one thread: the time of a training step (forward and backward, top-2 gating, training
capacity) and of an eval forward (eval capacity), as the median of per-round ratios over
interleaved rounds (``magneto.report.harness``); and the bytes each variant saves for backward
(``magneto.profiling.saved_tensor_bytes``, parameters and input excluded).

Three variants: torchscale; magneto as its models run it, the norm fused into the gate's
projection and every expert's fc1 and the residual added in the combine
(``moe(x, input_norm=norm, residual=x)``); magneto with the norm run once on its own
(``moe(norm(x), residual=x)``), the alternative the fused form was chosen over.

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
from magneto.profiling import saved_tensor_bytes
from magneto.report import harness

SIZES = ((256, 1024, 8, 2048), (512, 2048, 16, 4096))  # d, ffn, experts, tokens


def layers(d: int, ffn: int, experts: int):
    """(magneto's MoE layer and norm, torchscale's), the same parameters."""
    timm_standin.use_if_missing()
    from torchscale.architecture.config import EncoderConfig
    from torchscale.component.feedforward_network import make_experts
    from torchscale.component.xmoe.moe_layer import MOELayer
    from torchscale.component.xmoe.routing import Top2Gate

    from magneto import FeedForward, MagnetoConfig, NormLayer
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
    norm, norm_ts = NormLayer(d), torch.nn.LayerNorm(d)
    with torch.no_grad():  # off the identity
        norm.weight.normal_(1.0, 0.1), norm.bias.normal_(0.0, 0.1)
        norm_ts.load_state_dict(norm.state_dict())
    return (ours, norm), (theirs, norm_ts)


def variants(ours, theirs, x: torch.Tensor, training: bool) -> dict:
    (moe, norm), (moe_ts, norm_ts) = ours, theirs
    for module in (moe, norm, moe_ts, norm_ts):
        module.train(training)
    x = x.detach().requires_grad_(training)

    def step(half_layer):
        def run():
            torch.manual_seed(0)  # the same second-expert draws every call
            y, l_aux = half_layer()
            if training:
                (y.square().mean() + l_aux).backward()

        return run

    return {name: step(half_layer) for name, half_layer in half_layers(ours, theirs, x).items()}


def half_layers(ours, theirs, x: torch.Tensor) -> dict:
    """The three variants of ``x + moe(LN(x))``, each returning ``(y, l_aux)``."""
    (moe, norm), (moe_ts, norm_ts) = ours, theirs

    def torchscale():
        y, l_aux = moe_ts(norm_ts(x))
        return x + y, l_aux

    return {
        "torchscale": torchscale,
        "magneto": lambda: moe(x, input_norm=norm, residual=x),
        "norm once": lambda: moe(norm(x), residual=x),
    }


def saved_per_token(ours, theirs, x: torch.Tensor) -> dict:
    """d-vectors (d·4 bytes) per token each variant saves for backward, in training mode."""
    x = x.detach().requires_grad_()
    modules = (*ours, *theirs)
    for module in modules:
        module.train()
    exclude = [x, *(p for module in modules for p in module.parameters())]
    per_token = x[..., 0].numel() * x.shape[-1] * x.element_size()
    saved = {}
    for name, half_layer in half_layers(ours, theirs, x).items():
        torch.manual_seed(0)
        saved[name] = saved_tensor_bytes(half_layer, exclude)[0] / per_token
    return saved


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
    rows, memory = [], []
    for d, ffn, experts, tokens in SIZES:
        ours, theirs = layers(d, ffn, experts)
        x = torch.randn(tokens // 512, 512, d)
        saved = saved_per_token(ours, theirs, x)
        size = f"d={d}, ffn={ffn}, {experts} experts, {tokens} tokens"
        memory.append((size, *(f"{saved[n]:.2f}" for n in ("magneto", "norm once", "torchscale"))))
        for training in (True, False):
            times = harness.interleaved(variants(ours, theirs, x, training), cli.rounds, timer)
            mode = "fwd+bwd (train capacity)" if training else "fwd (eval capacity)"
            ms = harness.time_stats(times["magneto"])["median_s"] * 1e3
            rows.append(
                (
                    size,
                    mode,
                    f"{ms:.1f}",
                    harness.ratio_stats(times["magneto"], times["torchscale"]),
                    harness.ratio_stats(times["magneto"], times["norm once"]),
                )
            )
    dist.destroy_process_group()
    lines = [
        f"MoE half layer x + moe(LN(x)), top-2, fp32, 1 thread, {cli.rounds} interleaved rounds, "
        f"process CPU time ({harness.cpu_model()}); time ratios, median (min–max):",
        "",
        *harness.markdown_table(
            ("size", "pass", "magneto ms", "/ torchscale", "/ magneto, norm once"), rows
        ),
        "",
        "Saved for backward in training, d-vectors (d·4 bytes) per token:",
        "",
        *harness.markdown_table(("size", "magneto", "magneto, norm once", "torchscale"), memory),
        "",
        "Command: `python -m bench.bench_moe`",
    ]
    print("\n".join(lines))
    if cli.out:
        with open(cli.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
