"""BitNet in transformers: a small BitNet (offline ``AutoBitLinear`` projections, random ternary
weights, bf16) patched with ``apply_magneto`` against the same model unpatched, on the CPU (the
quantised kernels' device): logits and greedy tokens, one projection's time (norm + quantised
linear at one row, 2B-4T's gate_proj width), decoding time, resident projection bytes. The
whole-model numbers at 2B-4T's sizes are ``bench/bench_bitnet.py``'s (minutes to hours here).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from magneto.report.harness import cpu_timer, interleaved, markdown_table, ratio_stats

SIZES = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, vocab_size=2048)
"""The section's model: small enough for well under a minute, every width a multiple of the
packing unit (128)."""
TICKS = 3
MAX_ROUNDS = 5  # the section's rounds: the report's, at most this many


def _model(dtype: torch.dtype):
    import transformers
    from transformers.integrations.bitnet import AutoBitLinear

    config = transformers.BitNetConfig(
        **SIZES, num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(config).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if type(linear) is torch.nn.Linear:
                    n, k = linear.weight.shape
                    q = AutoBitLinear(k, n, bias=False, online_quant=False, dtype=dtype)
                    q.weight.data.copy_(torch.randint(-1, 2, (n, k), generator=gen))
                    q.weight_scale.fill_(0.05)
                    setattr(parent, name, q.requires_grad_(False))
    return model


def _projection_bytes(model) -> int:
    tensors = [
        t
        for layer in model.model.layers
        for parent in (layer.self_attn, layer.mlp)
        for name, child in parent.named_children()
        if name.endswith("_proj")
        for t in (*child.parameters(), *child.buffers())
    ]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def _op_variants(dtype):
    """RMSNorm 2560 -> gate_proj 6912 at one row: transformers' modules, magneto's call."""
    from transformers.integrations.bitnet import AutoBitLinear
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    import magneto_kernels
    from magneto_kernels import quant

    k, n = 2560, 6912
    # .to: transformers before 5.23 has no dtype argument here
    linear = AutoBitLinear(k, n, bias=False, online_quant=False).to(dtype)
    ternary = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(1))
    linear.weight.data.copy_(ternary)
    norm = BitNetRMSNorm(k, eps=1e-5).to(dtype)
    packed = quant.pack(ternary)
    x = torch.randn(1, k, dtype=dtype)
    return {
        "magneto": lambda: magneto_kernels.ln_linear(
            x,
            norm.weight,
            None,
            packed,
            eps=1e-5,
            norm="rms",
            quant="bitnet_offline",
            weight_scale=linear.weight_scale,
        ),  # fmt: skip
        "transformers": lambda: linear(norm(x)),
    }


PROMPTS = 8


def _logit_errors(reference) -> dict:
    """fp32 logits of ``PROMPTS`` prompts, ``‖a − b‖ / ‖b‖`` per prompt: magneto patched
    against transformers (its default attention, SDPA), and transformers against itself with its
    eager attention — the yardstick. A quantised model's activation codes are rounded, so a
    last-bit difference of any value upstream (a fused residual add, another attention kernel)
    flips the code of an element that sits within it of a rounding tie, and the flip moves every
    later position's logits by ~1e-2 (the kernels' codes are transformers' on the same input but at
    such ties: tests/test_quant_op.py). Both comparisons meet such flips on some prompts and agree
    to float32 rounding on the others."""
    from magneto.integrations import transformers as mt

    patched = mt.apply_magneto(copy.deepcopy(reference))
    eager = copy.deepcopy(reference)
    eager.config._attn_implementation = "eager"
    errors = {"magneto": [], "transformers_eager": []}
    for seed in range(PROMPTS):
        tokens = torch.randint(
            3, SIZES["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(seed)
        )
        with torch.no_grad():
            theirs = reference(tokens).logits.double()
            for name, model in (("magneto", patched), ("transformers_eager", eager)):
                diff = model(tokens).logits.double() - theirs
                errors[name].append((diff.norm() / theirs.norm()).item())
    return errors


def section(rounds: int, tick: Callable[[], None] = lambda: None) -> dict:
    """The section's JSON object; on the CPU whatever the report's device."""
    from magneto.integrations import transformers as mt

    rounds, timer = min(rounds, MAX_ROUNDS), cpu_timer()

    dtype = torch.bfloat16
    reference = _model(torch.float32)
    errors = _logit_errors(reference)
    tick()
    reference = reference.to(dtype)
    patched = mt.apply_magneto(copy.deepcopy(reference))
    tokens = torch.randint(3, SIZES["vocab_size"], (1, 4), generator=torch.Generator())
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        op = interleaved(_op_variants(dtype), rounds, timer)
        tick()
        decode = interleaved(
            {
                "magneto": lambda: patched.generate(tokens, **settings),
                "transformers": lambda: reference.generate(tokens, **settings),
            },
            rounds,
            timer,
            warmup=1,
        )
        same = torch.equal(
            patched.generate(tokens, **settings),
            reference.generate(tokens, **settings),
        )
    tick()
    return {
        "sizes": SIZES,
        "logits_rel_errors_fp32": errors,
        "greedy_tokens_equal_bf16": same,
        "op_ratio": ratio_stats(op["magneto"], op["transformers"]).as_dict(),
        "decode_ratio": ratio_stats(decode["magneto"], decode["transformers"]).as_dict(),
        "projection_bytes_ratio": _projection_bytes(patched) / _projection_bytes(reference),
    }


def markdown(row: dict) -> list[str]:
    sizes = row["sizes"]
    lines = [
        "## BitNet in transformers (`apply_magneto`, offline AutoBitLinear)",
        "",
        f"A BitNet of {sizes['num_hidden_layers']} layers, hidden {sizes['hidden_size']},"
        f" intermediate {sizes['intermediate_size']}, random ternary weights, on the CPU;"
        " times as magneto / transformers per round (median, min-max). The model at 2B-4T's"
        " sizes: `python -m bench.bench_bitnet` (bench/results/bitnet-cpu.md).",
        "",
    ]

    def errors(name: str) -> str:
        e = sorted(row["logits_rel_errors_fp32"][name])
        within = sum(x <= 1e-5 for x in e)
        return f"{within}/{len(e)}, {e[len(e) // 2]:.1e} ({e[-1]:.1e})"

    def ratio(stats: dict) -> str:
        return f"{stats['median']:.2f} ({stats['lo']:.2f}-{stats['hi']:.2f})"

    lines += markdown_table(
        ["check", "result"],
        [
            ["fp32 logits, ‖patched − transformers‖ / ‖transformers‖: prompts within 1e-5,"
             " median (max)", errors("magneto")],
            ["the same of transformers' eager attention against its SDPA (the yardstick)",
             errors("transformers_eager")],
            ["bf16 greedy tokens (8) equal to transformers'", row["greedy_tokens_equal_bf16"]],
            ["RMSNorm + gate_proj 2560->6912, one row: time ratio", ratio(row["op_ratio"])],
            ["greedy decoding of 8 tokens: time ratio", ratio(row["decode_ratio"])],
            ["projection weights resident: bytes ratio", f"{row['projection_bytes_ratio']:.3f}"],
        ],
    )  # fmt: skip
    return lines + [""]
