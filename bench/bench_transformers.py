"""transformers decoder layers patched by ``magneto.integrations.transformers`` vs unpatched.

Per family (Llama, BitNet, Kosmos-2, Kosmos-2.5 text): one decoder layer at a small training
size (default batch 4 × 128 tokens, hidden 512, FFN 2048, 8 heads, sdpa attention, dropouts 0,
fp32 or ``--dtype bfloat16``, 2 threads on CPU), built in a one-layer model and patched with
``apply_magneto``; the unpatched layer is a deep copy taken before patching. Columns:

- fwd+bwd: medians over rounds of one forward and backward (``out.sum().backward()``), the
  patched and unpatched layer timed alternately in every round; ratio = patched / unpatched.
- saved: bytes autograd keeps for backward during the forward (every distinct storage once,
  the layer's parameters and its input left out: ``magneto.profiling.saved_tensor_bytes``),
  per token.
- backend: the ``magneto_kernels`` backend the patched layer's calls ran on.

``--group`` instead times gate/up (RMSNorm 512 → 2 × 2048) as one ``ln_linear_group``, as one
``ln_linear`` per projection, and as one ``ln_linear`` on a packed weight (magneto's own models'
``in_proj``), per number of rows, with and without gradients: µs per call.

    python -m bench.bench_transformers [--device cuda] [--backend reference] [--dtype bfloat16]
                                       [--group]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import transformers

import magneto_kernels
from magneto.integrations import transformers as mt
from magneto.profiling import saved_tensor_bytes

FAMILIES = ("llama", "bitnet", "kosmos2", "kosmos2_5")


def build_model(family: str, hidden: int, ffn: int, heads: int) -> torch.nn.Module:
    """A one-layer causal LM of ``family``: the layer under test is ``model.model.layers[0]``."""
    from transformers.models.kosmos2 import modeling_kosmos2
    from transformers.models.kosmos2_5 import modeling_kosmos2_5

    if family in ("llama", "bitnet"):
        sizes = dict(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            bos_token_id=None,  # BitNet's defaults lie outside this small vocabulary
            eos_token_id=None,
        )
    else:
        sizes = dict(
            embed_dim=hidden,
            ffn_dim=ffn,
            layers=1,
            attention_heads=heads,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "bitnet": (transformers.BitNetConfig, transformers.BitNetForCausalLM),
        "kosmos2": (transformers.Kosmos2TextConfig, modeling_kosmos2.Kosmos2TextForCausalLM),
        "kosmos2_5": (
            transformers.Kosmos2_5TextConfig,
            modeling_kosmos2_5.Kosmos2_5TextForCausalLM,
        ),
    }[family]
    return model_cls(config_cls(vocab_size=128, attn_implementation="sdpa", **sizes))


def layer_kwargs(model, family: str, x: torch.Tensor) -> dict:
    if family in ("llama", "bitnet"):
        position_ids = torch.arange(x.shape[1], device=x.device)[None]
        return {"position_embeddings": model.model.rotary_emb(x, position_ids=position_ids)}
    return {}  # no mask: sdpa attends causally


def fwd_bwd_ms(layer, x, kwargs, sync) -> float:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    sync()
    start = time.perf_counter()
    layer(x, **kwargs).sum().backward()
    sync()
    return (time.perf_counter() - start) * 1e3


def bench_family(family: str, args, device: torch.device, sync) -> dict:
    torch.manual_seed(0)
    model = build_model(family, args.hidden, args.ffn, args.heads).to(device, args.dtype)
    reference = copy.deepcopy(model)
    mt.apply_magneto(model, backend=args.backend)
    for m in (model, reference):
        m.train()
    layers = {"patched": model.model.layers[0], "unpatched": reference.model.layers[0]}
    x = torch.randn(args.batch, args.tokens, args.hidden, device=device, dtype=args.dtype)
    x.requires_grad_()
    kwargs = layer_kwargs(model, family, x)
    times = {name: [] for name in layers}
    for round_ in range(args.warmup + args.rounds):
        order = list(layers) if round_ % 2 == 0 else list(reversed(layers))
        for name in order:
            ms = fwd_bwd_ms(layers[name], x, kwargs, sync)
            if round_ >= args.warmup:
                times[name].append(ms)
    saved = {}
    for name, layer in layers.items():
        nbytes, _ = saved_tensor_bytes(
            lambda layer=layer: layer(x, **kwargs), exclude=[*layer.parameters(), x]
        )
        saved[name] = nbytes / (args.batch * args.tokens)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "family": family,
        "patched_ms": median["patched"],
        "unpatched_ms": median["unpatched"],
        "ratio": median["patched"] / median["unpatched"],
        "saved_patched": saved["patched"],
        "saved_unpatched": saved["unpatched"],
        "backend": magneto_kernels.resolve_backend(args.backend, x),
    }


def bench_group(args, device: torch.device, sync) -> list[dict]:
    """gate/up three ways: ``ln_linear_group`` on two weights, one ``ln_linear`` per weight (the
    norm recomputed in each), and one ``ln_linear`` on a packed weight (magneto's own models'
    ``in_proj``: one parameter, its output split)."""
    torch.manual_seed(0)
    ln_weight = (1 + 0.1 * torch.randn(args.hidden, device=device)).requires_grad_()
    weights = [
        (torch.randn(args.ffn, args.hidden, device=device) * args.hidden**-0.5).requires_grad_()
        for _ in range(2)
    ]
    packed = torch.cat(weights).detach().requires_grad_()
    kw = dict(norm="rms", backend=args.backend)
    ways = {
        "group": lambda x: magneto_kernels.ln_linear_group(x, ln_weight, None, weights, **kw),
        "separate": lambda x: [
            magneto_kernels.ln_linear(x, ln_weight, None, w, **kw) for w in weights
        ],
        "packed": lambda x: magneto_kernels.ln_linear(x, ln_weight, None, packed, **kw).chunk(
            2, -1
        ),
    }
    results = []
    for grad in (False, True):
        for rows in (int(r) for r in args.group_rows.split(",")):
            x = torch.randn(rows, args.hidden, device=device, requires_grad=grad)

            def run(way, x=x, grad=grad):
                with torch.set_grad_enabled(grad):
                    outs = way(x)
                    if grad:
                        sum(o.sum() for o in outs).backward()

            calls = max(2, 256 // rows)
            times = {name: [] for name in ways}
            for round_ in range(args.warmup + args.rounds):
                for name, way in ways.items():
                    sync()
                    start = time.perf_counter()
                    for _ in range(calls):
                        run(way)
                    sync()
                    if round_ >= args.warmup:
                        times[name].append((time.perf_counter() - start) / calls * 1e6)
            median = {name: statistics.median(t) for name, t in times.items()}
            results.append({"grad": grad, "rows": rows, **median})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, help="magneto_kernels backend (default: auto)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument(
        "--group", action="store_true", help="time gate/up grouped vs separate vs packed"
    )
    parser.add_argument("--group-rows", default="1,4,16,64,256,1024", help="--group's row counts")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {device}, "
        f"{args.threads} threads, {str(args.dtype).removeprefix('torch.')}, {args.rounds} rounds; "
        f"load average {load[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    if args.group:
        print(f"gate/up: RMSNorm {args.hidden} -> 2 x {args.ffn}, µs per call (median)\n")
        print(
            "| grad | rows | group | separate calls | packed weight | group / separate "
            "| group / packed |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in bench_group(args, device, sync):
            print(
                f"| {'fwd+bwd' if r['grad'] else 'no_grad'} | {r['rows']} | {r['group']:.0f}"
                f" | {r['separate']:.0f} | {r['packed']:.0f} | {r['group'] / r['separate']:.2f}"
                f" | {r['group'] / r['packed']:.2f} |"
            )
        return
    print(
        f"one decoder layer, batch {args.batch} x {args.tokens} tokens, hidden {args.hidden}, "
        f"FFN {args.ffn}, {args.heads} heads, sdpa\n"
    )
    print(
        "| family | backend | unpatched fwd+bwd ms | patched ms | ratio "
        "| saved B/token unpatched | patched | saved / unpatched |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for family in args.families.split(","):
        r = bench_family(family, args, device, sync)
        print(
            f"| {family} | {r['backend']} | {r['unpatched_ms']:.2f} | {r['patched_ms']:.2f}"
            f" | {r['ratio']:.2f} | {r['saved_unpatched']:.0f} | {r['saved_patched']:.0f}"
            f" | {r['saved_patched'] / r['saved_unpatched']:.2f} |"
        )


if __name__ == "__main__":
    main()
