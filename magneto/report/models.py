"""The models the report compares: torchscale 0.3.0's and their magneto twins, same weights.

torchscale imports one function from timm (``timm.models.layers.drop_path``); where timm is not
installed the project's labelled stand-in is put on ``sys.path`` first.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn

import magneto
import magneto_kernels
from magneto.compat import timm_standin
from magneto.compat.torchscale import from_torchscale


def import_torchscale():
    """torchscale's architecture modules; ImportError (with how to install it) when missing."""
    timm_standin.use_if_missing()
    try:
        from torchscale.architecture import config, decoder, encoder, encoder_decoder
        from torchscale.component import embedding
    except ImportError as err:
        raise ImportError(
            f"torchscale 0.3.0 is not importable ({err}); install it with `pip "
            "install fairscale==0.4.0 && pip install --no-deps torchscale==0.3.0`"
        ) from err
    return config, encoder, decoder, encoder_decoder, embedding


@contextlib.contextmanager
def default_backend(backend: str):
    """Run models built with ``backend=None`` (e.g. by ``from_torchscale``) on ``backend``,
    through the documented environment variable."""
    old = os.environ.get(magneto_kernels.ENV_VAR)
    os.environ[magneto_kernels.ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ[magneto_kernels.ENV_VAR]
        else:
            os.environ[magneto_kernels.ENV_VAR] = old


def torchscale_stack(
    kind: str, d: int, heads: int, ffn: int, layers: int = 1, vocab: int = 0
) -> nn.Module:
    """torchscale's Sub-LN ``Encoder`` or decoder-only ``Decoder``, no output projection; with
    ``vocab > 0`` token and position embeddings of their own."""
    config, encoder, decoder, _, embedding = import_torchscale()
    sizes = dict(embed_dim=d, attention_heads=heads, ffn_embed_dim=ffn, layers=layers)
    prefix = "encoder" if kind == "encoder" else "decoder"
    args = {f"{prefix}_{k}": v for k, v in sizes.items()}
    args.update(subln=True, no_output_layer=vocab == 0, vocab_size=vocab)
    embeds = ()
    if vocab:
        embeds = (
            embedding.TextEmbedding(vocab, d, padding_idx=1),
            embedding.PositionalEmbedding(1024, d),
        )
    if kind == "encoder":
        return encoder.Encoder(config.EncoderConfig(**args), *embeds)
    return decoder.Decoder(config.DecoderConfig(**args), *embeds)


def twins(
    kind: str, d: int, heads: int, ffn: int, backends: list[str], device: str, dtype: torch.dtype
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """torchscale's one-layer stack and magneto's, one per backend, all with the same weights
    (torchscale's init, moved off it so that norms and biases are not trivial)."""
    torch.manual_seed(0)
    theirs = torchscale_stack(kind, d, heads, ffn)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    converted = from_torchscale(theirs)
    cls = magneto.Encoder if kind == "encoder" else magneto.Decoder
    ours = {}
    for backend in backends:
        model = cls(converted.config.replace(backend=backend))
        model.load_state_dict(converted.state_dict())
        ours[backend] = model.to(device=device, dtype=dtype)
    return theirs.to(device=device, dtype=dtype), ours


def layer_call(
    layer, kind: str, x: torch.Tensor, torchscale: bool, incremental_state: Optional[dict] = None
):
    """One call of a stack's layer (or its compiled twin) as its own stack calls it: the
    decoder's self-attention causal (torchscale: its additive mask; magneto: SDPA's causal flag)
    except for a one-token decoding step."""
    if kind == "encoder":
        return layer(x, None)[0]
    if incremental_state is not None:
        return layer(x, incremental_state=incremental_state)[0]
    if torchscale:
        mask = torch.full(
            (x.shape[1], x.shape[1]), float("-inf"), device=x.device, dtype=x.dtype
        ).triu(1)
        return layer(x, self_attn_mask=mask)[0]
    return layer(x, self_attn_causal=True)[0]
