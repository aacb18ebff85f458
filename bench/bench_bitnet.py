"""BitNet b1.58 at 2B-4T's sizes (hidden 2560, intermediate 6912, 20 heads, 5 KV heads,
vocabulary 128256), bf16, random ternary weights, built from a config (nothing downloaded):
magneto's quantised ``ln_linear`` against transformers' own path. Three parts, and the head:

- ``op``: one projection (RMSNorm 2560 -> gate_proj 6912, and down_proj's relu2_glu 2·6912 ->
  2560) at 1, 8, 128 and 2048 rows: transformers (BitNetRMSNorm then offline ``AutoBitLinear``,
  which multiplies dequantised bf16 weights), magneto's "bitnet_offline" (2-bit weights, int8
  activations, integer kernels), and a plain dense linear after the norm in bf16 and fp32.
  µs per call, medians over rounds, every variant timed in every round.
- ``model``: a model of ``--layers`` decoder layers (``--layers 30``: the whole 2B-4T, whose
  bf16 projection weights alone are 4.2 GB; default 2), the embedding and the dense head
  (128256 × 2560): patched with ``apply_magneto`` (dense head, and ``output_projection="int8"``)
  and unpatched, built once, the variants interleaved in every round: resident bytes (the
  projections' and the whole model's), greedy decoding (KV cache) tokens/s on each of
  ``--threads``, prefill of ``--prefill`` tokens, and the int8 head's argmax agreement with the
  dense head's.
- ``head``: the output projection alone at ``--head-rows`` (1, 8, 128) on each of ``--threads``:
  magneto's ``int8_head``, ``aten._weight_int8pack_mm`` and the bf16 dense head, with GB/s.
- ``split``: where one decoded token's time goes, one thread, patched (dense head) and
  unpatched, at each of ``--split-layers`` layer counts: the whole token (``generate``), the
  decoder layers (``model.model``'s step over the KV cache), the dense head's call; the
  difference of two layer counts is a layer's cost, and of a patched layer, its four fused
  calls made directly (without the adapters). Thread CPU time (``time.thread_time``), the
  fastest of ``--rounds``: on a loaded machine it leaves out the time spent waiting for a core.

    python -m bench.bench_bitnet [--part op|head|model|split|all] [--threads 1 2] [--rows 1 8]
        [--head-rows 1 8 128] [--layers 30] [--split-layers 2 6]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import magneto_kernels
from magneto_kernels import quant

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 2560, 6912, 20, 5, 30, 128256
ROWS = (1, 8, 128, 2048)
HEAD_ROWS = (1, 8, 128)


def _median_us(fns: dict, rounds: int, min_time: float = 0.2) -> dict:
    """Median µs per call of each function, timed alternately in every round."""
    for fn in fns.values():
        fn()
    reps = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        reps[name] = max(1, int(min_time / rounds / max(once, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - start) / reps[name] * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_op(rounds: int, rows_list=ROWS) -> None:
    from transformers.integrations.bitnet import AutoBitLinear
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    torch.manual_seed(0)
    dtype = torch.bfloat16
    print("| projection | rows | transformers (µs) | magneto (µs) | bf16 linear (µs) |"
          " fp32 linear (µs) | magneto / transformers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, k, n, gated in (
        ("gate_proj", HIDDEN, INTER, False),
        ("down_proj", INTER, HIDDEN, True),
    ):
        ternary = torch.randint(-1, 2, (n, k)).to(dtype)
        linear = AutoBitLinear(k, n, bias=False, online_quant=False, dtype=dtype)
        linear.weight.data.copy_(ternary)
        linear.weight_scale.fill_(0.02)
        linear.requires_grad_(False)
        norm = BitNetRMSNorm(k, eps=1e-5).to(dtype)
        packed = quant.pack(ternary)
        ws = linear.weight_scale
        dense32 = ternary.float() * 0.02
        for rows in rows_list:
            x = torch.randn(rows, 2 * k if gated else k, dtype=dtype)

            def act(x):
                return quant.relu2_glu(x) if gated else x

            def hf():
                return linear(norm(act(x)))

            def ours():
                return magneto_kernels.ln_linear(
                    x, norm.weight, None, packed, eps=1e-5, norm="rms",
                    input_activation="relu2_glu" if gated else None,
                    quant="bitnet_offline", weight_scale=ws,
                )  # fmt: skip

            def bf16():
                return F.linear(norm(act(x)), ternary)

            def fp32():
                return F.linear(norm(act(x)).float(), dense32)

            with torch.no_grad():
                t = _median_us({"hf": hf, "ours": ours, "bf16": bf16, "fp32": fp32}, rounds)
            print(f"| {name} {k}->{n} | {rows} | {t['hf']:.0f} | {t['ours']:.0f} |"
                  f" {t['bf16']:.0f} | {t['fp32']:.0f} | {t['ours'] / t['hf']:.2f} |")  # fmt: skip


def build_model(layers: int, mode: str = "offline"):
    """A BitNet of ``layers`` layers at 2B-4T's widths, projections offline AutoBitLinear with
    random ternary weights, bf16."""
    import transformers
    from transformers.integrations.bitnet import AutoBitLinear

    config = transformers.BitNetConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.device("meta"):  # built without data, then each tensor filled once
        model = transformers.BitNetForCausalLM(config).to(torch.bfloat16)
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, linear in list(parent.named_children()):
                    if isinstance(linear, torch.nn.Linear):
                        q = AutoBitLinear(
                            linear.in_features, linear.out_features, bias=False,
                            online_quant=False, dtype=torch.bfloat16,
                        )  # fmt: skip
                        setattr(parent, name, q.requires_grad_(False))
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AutoBitLinear):
                ternary = torch.randint(-1, 2, module.weight.shape, generator=generator)
                module.weight.copy_(ternary.to(torch.int8))
                module.weight_scale.fill_(1.0)
            elif hasattr(module, "variance_epsilon"):
                module.weight.fill_(1.0)
            elif isinstance(module, (torch.nn.Embedding, torch.nn.Linear)):
                module.weight.normal_(0, 0.02, generator=generator)
        rotary = model.model.rotary_emb  # its buffers, computed on construction, as built
        for name, buffer in type(rotary)(config).named_buffers():
            getattr(rotary, name).copy_(buffer)
    return model.eval()


def _timed_rounds(fns: dict, rounds: int, warmups: dict) -> dict:
    """Seconds per call of each function, one call of each per round (the variants interleaved,
    so that the machine's load falls on all of them alike), the median over rounds, after one
    call of each of ``warmups`` (the same paths; cheaper calls where they warm the same sizes). For
    calls of seconds or minutes, where ``_median_us``'s calibration would double the run."""
    for fn in warmups.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def resident_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(the decoder layers' projection tensors, the whole model): bytes of the distinct
    storages of parameters and buffers with data (a dropped weight is a meta tensor: none)."""

    def total(tensors) -> int:
        storages = {}
        for t in tensors:
            if t is not None and t.device.type != "meta":
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def tensors(module):
        return [*module.parameters(), *module.buffers()]

    projections = [
        t
        for layer in model.model.layers
        for parent in (layer.self_attn, layer.mlp)
        for name, child in parent.named_children()
        if name.endswith("_proj")
        for t in tensors(child)
    ]
    return total(projections), total(tensors(model))


def bench_model(layers: int, threads: list, prefill: int, new_tokens: int, rounds: int,
                prefill_rounds: int) -> None:  # fmt: skip
    """Patched (dense head and int8 head) against unpatched: resident bytes, greedy decoding
    tokens/s with the KV cache, prefill of ``prefill`` tokens (the logits of the last only), on
    each of ``threads``; the models are built once."""
    from magneto.integrations import transformers as mt

    model = mt.apply_magneto(build_model(layers))  # first: its bf16 weights are dropped
    ours = resident_bytes(model)
    dense_head = copy.deepcopy(model.lm_head)
    mt.apply_magneto(model, output_projection="int8")
    heads = {"dense": dense_head, "int8": model.lm_head}
    reference = build_model(layers)
    theirs = resident_bytes(reference)
    int8_bytes = sum(t.numel() * t.element_size() for t in heads["int8"].buffers())
    print(f"{layers} layers, resident: projection weights {ours[0] / 2**20:.0f} MiB patched,"
          f" {theirs[0] / 2**20:.0f} MiB unpatched ({ours[0] / theirs[0]:.3f}x); whole model"
          f" {ours[1] / 2**30:.2f} GiB patched (+{int8_bytes / 2**30:.2f} GiB with the int8"
          f" head), {theirs[1] / 2**30:.2f} GiB unpatched")  # fmt: skip

    def run(head, call):
        def fn():
            model.lm_head = heads[head]
            return call(model)

        return fn

    prompt = torch.randint(0, VOCAB, (1, 8))
    long = torch.randint(0, VOCAB, (1, prefill))
    positions = long[:, :32]

    def decode(m, tokens=new_tokens):
        return m.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    def fill(m, ids=long):
        return m(ids, use_cache=False, logits_to_keep=1)

    def warm(call, *args):
        return {
            "dense": run("dense", lambda m: call(m, *args)),
            "int8": run("int8", lambda m: call(m, *args)),
            "hf": lambda: call(reference, *args),
        }

    def argmax(m):
        return m(positions, use_cache=False).logits.argmax(-1)

    with torch.no_grad():
        # the int8 head's choice against the dense head's at every position of one input
        # (teacher-forced: one flip does not change the positions after it)
        same = (run("int8", argmax)() == run("dense", argmax)()).sum().item()
        print(f"int8 head: argmax equal to the dense head's at {same}/{positions.shape[1]}"
              " positions (random weights: near-tied logits)")  # fmt: skip
        for n in threads:
            torch.set_num_threads(n)
            decoders = {"dense": run("dense", decode), "int8": run("int8", decode)}
            t = _timed_rounds(
                {**decoders, "hf": lambda: decode(reference)}, rounds, warm(decode, 2)
            )
            print(f"threads {n}, {layers} layers, greedy decoding of {new_tokens} tokens after"
                  f" 8: tokens/s patched {new_tokens / t['dense']:.2f} (dense head),"
                  f" {new_tokens / t['int8']:.2f} (int8 head), unpatched"
                  f" {new_tokens / t['hf']:.2f}; time ratios {t['dense'] / t['hf']:.2f},"
                  f" {t['int8'] / t['hf']:.2f}", flush=True)  # fmt: skip
            # warmed by a call of the full length: the first call of a size pays one-time
            # costs (allocator growth, first touches of fresh buffers) a shorter warm-up leaves
            # in the timed call
            fills = {"ours": run("dense", fill), "hf": lambda: fill(reference)}
            p = _timed_rounds(fills, prefill_rounds, fills)
            print(f"threads {n}, {layers} layers, prefill {prefill}: {p['ours']:.1f} s patched,"
                  f" {p['hf']:.1f} s unpatched (ratio {p['ours'] / p['hf']:.2f})",
                  flush=True)  # fmt: skip


def bench_head(threads: list, rounds: int, rows_list=HEAD_ROWS) -> None:
    """The output projection (128256 × 2560): magneto's int8 head (``int8_head``) against torch's
    ``aten._weight_int8pack_mm`` on the same int8 weight and scales, and the bf16 dense head as
    a patched model runs it by default (``ln_linear`` without a norm: magneto's GEMM engine)
    against transformers' (``F.linear``); x in bf16. The four interleaved in every round; GB/s
    of the weight (int8: 328 MB, bf16: 656 MB) per call."""
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16) * 0.02
    scale = (weight.float().abs().amax(dim=1) / 127).to(torch.bfloat16)
    q = torch.round(weight.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    print("| threads | rows | magneto int8 (µs) | aten int8 (µs) | magneto bf16 (µs) |"
          " bf16 F.linear (µs) | magneto int8 / aten | magneto int8 / bf16 F.linear |"
          " magneto bf16 / bf16 F.linear |"
          " GB/s magneto int8, aten, magneto bf16, bf16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in threads:
        torch.set_num_threads(n)
        for rows in rows_list:
            x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16) + 0.5
            fns = {
                "ours": lambda: magneto_kernels.int8_head(x, q, scale),
                "aten": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
                "dense": lambda: magneto_kernels.ln_linear(x, None, None, weight, None),
                "bf16": lambda: F.linear(x, weight),
            }
            with torch.no_grad():
                t = _median_us(fns, rounds)
            gbs = [q.numel() / t[v] / 1e3 for v in ("ours", "aten")]
            gbs += [weight.numel() * 2 / t[v] / 1e3 for v in ("dense", "bf16")]
            print(f"| {n} | {rows} | {t['ours']:.0f} | {t['aten']:.0f} | {t['dense']:.0f} |"
                  f" {t['bf16']:.0f} | {t['ours'] / t['aten']:.2f} |"
                  f" {t['ours'] / t['bf16']:.2f} | {t['dense'] / t['bf16']:.2f} |"
                  f" {', '.join(f'{g:.1f}' for g in gbs)} |")  # fmt: skip


def _cpu_ms(fn, rounds: int, calls: int = 1) -> float:
    """Thread CPU ms per call of fn, the fastest of ``rounds`` rounds of ``calls`` calls."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e3


def bench_split(layer_counts: list, rounds: int, new_tokens: int = 8) -> None:
    """The ``split`` part (see the top of the file)."""
    from transformers import DynamicCache

    from magneto.integrations import transformers as mt

    torch.set_num_threads(1)
    prompt = torch.randint(0, VOCAB, (1, 8))
    rows = {}
    for layers in layer_counts:
        models = {
            "patched": mt.apply_magneto(build_model(layers)),
            "unpatched": build_model(layers),
        }
        for name, m in models.items():

            def generate(n, m=m):
                m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

            cache = DynamicCache(config=m.config)
            m.model(prompt, past_key_values=cache, use_cache=True)
            tokens = iter(torch.randint(0, VOCAB, (1, 10_000)).split(1, dim=1))
            hidden = torch.randn(1, 1, HIDDEN, dtype=torch.bfloat16)
            rows[name, layers] = {
                "token": _cpu_ms(lambda: generate(new_tokens + 1), rounds)
                - _cpu_ms(lambda: generate(1), rounds),
                "layers": _cpu_ms(
                    lambda: m.model(next(tokens), past_key_values=cache, use_cache=True), rounds, 8
                ),
                "head": _cpu_ms(lambda: m.lm_head(hidden), rounds),
            }
            rows[name, layers]["token"] /= new_tokens
        layer = models["patched"].model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        x = torch.randn(1, 1, HIDDEN, dtype=torch.bfloat16)
        gated = torch.randn(1, 1, 2 * INTER, dtype=torch.bfloat16)

        def fused_calls():  # the four calls of a patched layer, arguments built beforehand
            for norm, linears, h in fused_args:
                if len(linears) > 1:
                    packed = [q._magneto_packed for q in linears]
                    magneto_kernels.ln_linear_group(
                        x, norm.weight, None, packed, eps=norm.variance_epsilon, norm="rms",
                        quant="bitnet_offline", weight_scales=scales[len(linears)],
                    )  # fmt: skip
                else:
                    magneto_kernels.ln_linear(
                        h, norm.weight, None, linears[0]._magneto_packed, eps=norm.variance_epsilon,
                        norm="rms", quant="bitnet_offline", weight_scale=linears[0].weight_scale,
                        input_activation="relu2_glu" if h is gated else None, residual=x,
                    )  # fmt: skip

        fused_args = [
            (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj), x),
            (attn.attn_sub_norm, (attn.o_proj,), x),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), x),
            (mlp.ffn_sub_norm, (mlp.down_proj,), gated),
        ]
        scales = {n: torch.ones(n, dtype=torch.bfloat16) for n in (2, 3)}
        rows["fused calls", layers] = {"layers": _cpu_ms(fused_calls, rounds, 4) * layers}
        del models
    print("| | layers | token (ms) | decoder layers (ms) | dense head (ms) | rest (ms) |")
    print("|---|---|---|---|---|---|")
    for (name, layers), r in rows.items():
        if "token" in r:
            rest = r["token"] - r["layers"] - r["head"]
            print(f"| {name} | {layers} | {r['token']:.1f} | {r['layers']:.1f} | {r['head']:.1f}"
                  f" | {rest:.1f} |")  # fmt: skip
    low, high = min(layer_counts), max(layer_counts)
    for name in ("patched", "unpatched", "fused calls"):
        slope = (rows[name, high]["layers"] - rows[name, low]["layers"]) / (high - low)
        print(f"{name}: {slope:.2f} ms a layer ({low} -> {high} layers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("op", "head", "model", "split", "all"), default="all")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="op part's rows")
    parser.add_argument("--head-rows", type=int, nargs="+", default=list(HEAD_ROWS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill-rounds", type=int, default=1)
    parser.add_argument("--split-layers", type=int, nargs=2, default=[2, 6])
    args = parser.parse_args()
    if args.part in ("op", "all"):
        torch.set_num_threads(args.threads[0])
        bench_op(args.rounds, args.rows)
    if args.part in ("head", "all"):
        bench_head(args.threads, args.rounds, args.head_rows)
    if args.part in ("model", "all"):
        bench_model(
            args.layers, args.threads, args.prefill, args.new_tokens, args.rounds,
            args.prefill_rounds,
        )  # fmt: skip
    if args.part in ("split", "all"):
        with torch.no_grad():
            bench_split(args.split_layers, args.rounds)


if __name__ == "__main__":
    main()
