"""Greedy decoding with the KV cache: magneto against torchscale, the same weights, on CPU.

Two models, each taken from torchscale 0.3.0 and converted with ``from_torchscale`` (so both
sides hold identical weights), Sub-LN, fp32 (``--dtype bfloat16``: both in bf16),
``torch.no_grad``, ``eval()``:

- decoder-only: ``Decoder``, 12 layers, d=768, 12 heads, FFN 3072;
- encoder-decoder: ``EncoderDecoder``, 6 + 6 layers of the same width, a 64-token source.

Each decodes ``--tokens`` tokens greedily after a ``--prompt``-token prompt (default 4) for a
batch of 1 and of 8 sequences: the prompt in one causal call that caches its keys and values
(``incremental_state["is_first_step"] = True``), then the growing prefix with
``incremental_state`` as torchscale's generation loop calls it (the decoder embeds only the
last token). torchscale concatenates each layer's cache with the new keys and values at every
step; magneto writes them into room after it (``magneto.kv_cache.KVRoom``). magneto's
cross-attention keeps the encoder output's keys and values in the state after the first step;
torchscale projects them again at every step. Both sides must pick the same tokens (checked).

The timings are interleaved rounds (``magneto.report.harness.interleaved``), one generation of
each side per round; the ratio is magneto's time over torchscale's, the median of the per-round
ratios with their range. Run it from the checkout:

    python -m bench.bench_decode [--rounds 7] [--tokens 16] [--prompt 4] [--threads 2] [--dtype D]
"""

from __future__ import annotations

import argparse

import torch

import magneto_kernels
from magneto.compat.torchscale import from_torchscale
from magneto.report import harness
from magneto.report.models import import_torchscale, torchscale_stack

D, HEADS, FFN, VOCAB = 768, 12, 3072, 1000


def _models(kind: str, dtype: torch.dtype):
    """torchscale's model and its magneto conversion, with the same weights, in ``dtype``."""
    torch.manual_seed(0)
    if kind == "decoder":
        theirs = torchscale_stack("decoder", D, HEADS, FFN, layers=12, vocab=VOCAB)
    else:
        config, _, _, encoder_decoder, embedding = import_torchscale()
        sizes = dict(embed_dim=D, attention_heads=HEADS, ffn_embed_dim=FFN, layers=6)
        args = config.EncoderDecoderConfig(
            **{f"{side}_{k}": v for side in ("encoder", "decoder") for k, v in sizes.items()},
            vocab_size=VOCAB,
            subln=True,
        )
        theirs = encoder_decoder.EncoderDecoder(
            args,
            embedding.TextEmbedding(VOCAB, D, padding_idx=1),
            embedding.PositionalEmbedding(1024, D),
            embedding.TextEmbedding(VOCAB, D, padding_idx=1),
            embedding.PositionalEmbedding(1024, D),
        )
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = from_torchscale(theirs)
    return theirs.to(dtype).eval(), ours.to(dtype).eval()


def _generate(model, kind: str, prompt: torch.Tensor, tokens: int, source: torch.Tensor):
    """Greedy tokens after ``prompt``: the prompt cached in one call, then the model called on
    the growing prefix with the cache."""
    state, out = {"is_first_step": True}, prompt
    with torch.no_grad():
        decoder = model if kind == "decoder" else model.decoder
        enc = None if kind == "decoder" else model.encoder(source)
        for _ in range(tokens):
            if kind == "decoder":
                logits = decoder(out, incremental_state=state)[0]
            else:
                logits = decoder(out, encoder_out=enc, incremental_state=state)[0]
            state["is_first_step"] = False
            out = torch.cat([out, logits[:, -1:].argmax(-1)], dim=1)
    return out[:, prompt.shape[1] :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=4, help="prompt tokens, cached in one call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    timer = harness.cpu_timer(args.threads)
    backend = magneto_kernels.resolve_backend(None, torch.empty(0))
    print(
        f"# Greedy decoding, {args.tokens} tokens after a {args.prompt}-token prompt, "
        f"magneto ({backend}) / torchscale, {args.dtype}"
    )
    print(f"\n{harness.cpu_model()}, {args.threads} threads, {timer.clock}, {args.rounds} rounds\n")
    rows = []
    for kind in ("decoder", "encoder_decoder"):
        theirs, ours = _models(kind, dtype)
        for batch in (1, 8):
            gen = torch.Generator().manual_seed(batch)
            prompt = torch.randint(2, VOCAB, (batch, args.prompt), generator=gen)
            source = torch.randint(2, VOCAB, (batch, 64), generator=gen)
            picked = [_generate(m, kind, prompt, args.tokens, source) for m in (ours, theirs)]
            same = torch.equal(*picked)
            variants = {
                name: (lambda m=m: _generate(m, kind, prompt, args.tokens, source))
                for name, m in (("magneto", ours), ("torchscale", theirs))
            }
            times = harness.interleaved(variants, args.rounds, timer, warmup=1)
            ratio = harness.ratio_stats(times["magneto"], times["torchscale"])
            rows.append((kind, batch, str(ratio), "yes" if same else "NO"))
    print("\n".join(harness.markdown_table(("model", "batch", "time ratio", "same tokens"), rows)))


if __name__ == "__main__":
    main()
