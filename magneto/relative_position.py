"""Relative position buckets (T5's bias, as torchscale 0.3.0 has it: ``rel_pos_buckets``,
``max_rel_pos``; ``torchscale/component/relative_position_bias.py``).

A learned scalar per head and bucket is added to every attention score; the bucket of a
(query i, key j) pair depends on ``j − i`` only: distances below ``max_exact`` (a quarter of
the buckets when bidirectional, else half) get a bucket each, longer ones share buckets
spaced logarithmically up to ``max_distance``, beyond which all fall into the last one.
Bidirectional tables give keys before and after the query separate halves.

How torchscale uses it (``architecture/encoder.py``, ``decoder.py``):

- the encoder owns one table (``relative_position``), computes the (batch·heads, len, len) bias
  once per forward and passes it as ``rel_pos`` to every layer's self-attention;
- the decoder owns ``self_attn_relative_position`` and, in an encoder-decoder,
  ``cross_attn_relative_position`` (queries are decoder positions, keys encoder positions),
  each computed once per forward and passed to every layer (``self_attn_rel_pos``,
  ``cross_attn_rel_pos``);
- all three tables are built with torchscale's default ``bidirectional=True``, the decoder's
  self-attention table included (its causal mask hides the keys after the query anyway);
- attention adds ``rel_pos`` to the scaled scores after the masks, before the softmax.

During incremental decoding torchscale slices the batch·heads dimension (``bias[-1:]``) where it
means the last query row, and its view then fails; ``bias(1, klen, step=klen − 1)`` here is
that last row, computed alone.

magneto's ``Encoder`` and ``Decoder`` own the same tables under the same names
(``MagnetoConfig.rel_pos_buckets``/``max_rel_pos``) and compute the (1, heads, tgt, src) bias
once per forward, for the query rows the call computes; attention adds it inside SDPA's
additive mask (``magneto.masks.sdpa_mask``), broadcast over the batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


def relative_position_bucket(
    relative_position: Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """The bucket (int64) of each ``key position − query position``, torchscale's arithmetic."""
    buckets = torch.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        buckets += (n < 0).to(torch.long) * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    # torchscale takes log(0) for the short distances and discards it: clamp them instead
    far = n.clamp(min=max_exact).float()
    log_ratio = torch.log(far / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(n < max_exact, n, large)


def check_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    """ValueError unless the buckets leave an exact range below ``max_distance``."""
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_exact < 1:
        raise ValueError(
            f"num_buckets={num_buckets} leaves no exact bucket "
            f"({'>= 4 when bidirectional' if bidirectional else '>= 2'})"
        )
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance={max_distance} must exceed the exact range {max_exact} "
            f"(num_buckets={num_buckets})"
        )


class RelativePositionBias(nn.Module):
    """torchscale's ``RelativePositionBias``: parameter ``relative_attention_bias.weight``
    (num_buckets, num_heads), an ``nn.Embedding`` (its default N(0, 1) init, as torchscale's).

    ``bias(qlen, klen, step)`` gives the (1, heads, qlen, klen) bias, broadcast over the batch
    (what ``scaled_dot_product_attention`` takes as ``attn_mask``); ``forward(batch_size, qlen,
    klen, step)`` gives torchscale's (batch·heads, qlen, klen) copy of it.
    """

    def __init__(
        self,
        num_buckets: int = 32,
        max_distance: int = 128,
        num_heads: int = 12,
        bidirectional: bool = True,
    ):
        super().__init__()
        check_buckets(num_buckets, max_distance, bidirectional)
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.num_heads, self.bidirectional = num_heads, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def reset_parameters(self) -> None:
        self.relative_attention_bias.reset_parameters()

    def buckets(self, qlen: int, klen: int, step: int = 0) -> Tensor:
        """(qlen, klen) buckets of queries at positions ``step`` … ``step + qlen − 1`` against
        keys at positions 0 … ``klen − 1``."""
        device = self.relative_attention_bias.weight.device
        query = torch.arange(step, step + qlen, dtype=torch.long, device=device)
        key = torch.arange(klen, dtype=torch.long, device=device)
        return relative_position_bucket(
            key[None, :] - query[:, None], self.bidirectional, self.num_buckets, self.max_distance
        )

    def bias(self, qlen: int, klen: int, step: int = 0) -> Tensor:
        """(1, heads, qlen, klen): the additive score bias, in the table's dtype. A decoding
        step's row is ``bias(1, klen, step=position of the new token)``."""
        return self.relative_attention_bias(self.buckets(qlen, klen, step)).permute(2, 0, 1)[None]

    def forward(self, batch_size: int, qlen: int, klen: int, step: Optional[int] = None) -> Tensor:
        """torchscale's call: (batch·heads, qlen, klen), batch-major as torchscale's scores."""
        bias = self.bias(qlen, klen, 0 if step is None else step)
        return bias.expand(batch_size, -1, -1, -1).reshape(-1, qlen, klen)

    def extra_repr(self) -> str:
        return (
            f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
            f"num_heads={self.num_heads}, bidirectional={self.bidirectional}"
        )
