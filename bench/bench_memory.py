"""Activation memory of one training step: bytes saved for backward per token, in d-vectors.

One Sub-LN encoder layer with its final LayerNorm (d=256, 4 heads, FFN 1024, T=128, fp32),
every distinct saved storage counted once, parameters and the input left out
(``magneto.profiling.saved_tensor_bytes``). torchscale 0.3.0's encoder next to ours, per backend.

    python bench/bench_memory.py            # writes bench/results/memory.md
"""

from __future__ import annotations

import os

import torch

import magneto
import magneto_kernels
from magneto.compat import timm_standin
from magneto.profiling import saved_tensor_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
timm_standin.use_if_missing()  # torchscale imports timm.models.layers.drop_path

D, HEADS, FFN, T, BATCH = 256, 4, 1024, 128, 2


def _per_token_d_vectors(encoder: torch.nn.Module) -> float:
    encoder.train()
    x = torch.randn(BATCH, T, D, requires_grad=True)
    nbytes, _ = saved_tensor_bytes(
        lambda: encoder(None, token_embeddings=x)["encoder_out"], exclude=[*encoder.parameters(), x]
    )
    return nbytes / (BATCH * T * D * x.element_size())


def torchscale_encoder(d: int = D, heads: int = HEADS, ffn: int = FFN) -> torch.nn.Module:
    """torchscale 0.3.0's Sub-LN encoder: one layer and the final LayerNorm, no embeddings."""
    from torchscale.architecture.config import EncoderConfig
    from torchscale.architecture.encoder import Encoder

    config = EncoderConfig(
        encoder_embed_dim=d,
        encoder_attention_heads=heads,
        encoder_ffn_embed_dim=ffn,
        encoder_layers=1,
        subln=True,
        no_output_layer=True,
    )
    return Encoder(config)


def magneto_encoder(
    backend: str, d: int = D, heads: int = HEADS, ffn: int = FFN
) -> torch.nn.Module:
    """The same model in magneto, on one backend."""
    config = magneto.MagnetoConfig(
        embed_dim=d,
        num_heads=heads,
        ffn_dim=ffn,
        encoder_layers=1,
        positions="none",
        backend=backend,
    )
    return magneto.Encoder(config)


def main() -> None:
    torch.manual_seed(0)
    rows = [("torchscale 0.3.0 (eager)", _per_token_d_vectors(torchscale_encoder()))]
    for backend, problem in magneto_kernels.available_backends("cpu").items():
        if problem is None and not (backend == "triton"):  # the interpreter is too slow at T=128
            rows.append(
                (f"magneto, backend={backend}", _per_token_d_vectors(magneto_encoder(backend)))
            )
    lines = [
        f"Saved for backward per token, one Sub-LN encoder layer + final LN "
        f"(d={D}, {HEADS} heads, FFN {FFN}, T={T}, batch {BATCH}, fp32), in d-vectors "
        f"({D * 4} bytes):",
        "",
        "| model | d-vectors per token |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "memory.md"), "w") as f:
        f.write("Command: `python bench/bench_memory.py`\n\n" + text)


if __name__ == "__main__":
    main()
