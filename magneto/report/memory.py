"""Memory: bytes saved for backward per token by one Sub-LN layer in training.

Every distinct storage autograd saves is counted once, parameters and the input left out
(``magneto.profiling.saved_tensor_bytes``; docs/design.md, Memory accounting). Also given in
d-vectors (``d`` elements of the layer's dtype) per token.
"""

from __future__ import annotations

from typing import Callable

import torch

from magneto.profiling import saved_tensor_bytes
from magneto.report.models import layer_call, twins


def saved_per_token(
    backends: list[str],
    d: int,
    heads: int,
    ffn: int,
    batch: int,
    tokens: int,
    device: str,
    dtype: torch.dtype,
    tick: Callable[[], None] = lambda: None,
) -> list[dict]:
    rows = []
    for kind in ("encoder", "decoder"):
        theirs, ours = twins(kind, d, heads, ffn, [*backends, "reference"], device, dtype)
        models = {f"magneto {be}": (m.layers[0], False) for be, m in ours.items()}
        models["magneto reference"] = models.pop("magneto reference")  # after the fused ones
        models["torchscale"] = (theirs.layers[0], True)
        for name, (layer, is_ts) in models.items():
            layer.train()
            x = torch.randn(batch, tokens, d, device=device, dtype=dtype, requires_grad=True)
            nbytes, _ = saved_tensor_bytes(
                lambda layer=layer, kind=kind, x=x, is_ts=is_ts: layer_call(layer, kind, x, is_ts),
                exclude=[*layer.parameters(), x],
            )
            per_token = nbytes / (batch * tokens)
            rows.append(
                {
                    "layer": kind,
                    "model": name,
                    "bytes_per_token": per_token,
                    "d_vectors_per_token": per_token / (d * x.element_size()),
                }
            )
            tick()
    return rows
