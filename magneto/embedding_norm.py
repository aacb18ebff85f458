"""torchscale's ``layernorm_embedding``: a LayerNorm on the embedded tokens, after the embedding
scale and the positions and before the embedding dropout (``forward_embedding`` of torchscale
0.3.0's ``Encoder`` and ``Decoder``):

    x = dropout( LN_emb( embed_scale·embed_tokens(tokens) + embed_positions(tokens) ) )

The norm's output is the residual stream itself, so it is a norm of its own (one
``magneto_kernels.layer_norm`` call through the norm module), not fused into a projection.

Parameters: ``layernorm_embedding.weight`` / ``.bias`` on the encoder or decoder
(``MagnetoConfig.layernorm_embedding``): a ``NormLayer`` of ``embed_dim`` of the model's norm
kind and eps (torchscale's: a LayerNorm with ``layernorm_eps``). In a multiway encoder
torchscale makes it a multiway pair split along the sequence (``layernorm_embedding.A`` /
``.B``): each part gets its copy (``Stack.embedding_output``). During incremental decoding the
decoder normalises only the new position's row (torchscale keeps the last token and its
position before this step).
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


def embedding_output(
    embed: Tensor,
    positions: Optional[Tensor] = None,
    layernorm_embedding: Optional[Callable[[Tensor], Tensor]] = None,
    dropout: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """``dropout(layernorm_embedding(embed + positions))``, each step skipped when None.

    ``embed``: the scaled token embedding (batch, length, d); ``positions``: the position
    embedding, broadcastable to it; ``layernorm_embedding`` and ``dropout`` are called (modules:
    their hooks and replacements apply), not read.
    """
    x = embed if positions is None else embed + positions
    if layernorm_embedding is not None:
        x = layernorm_embedding(x)
    return x if dropout is None else dropout(x)
