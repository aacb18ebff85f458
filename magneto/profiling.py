"""Measure what autograd keeps for backward: bytes of the distinct storages a forward saves.

What one Magneto layer saves, and why: docs/design.md, Memory accounting.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def saved_tensor_bytes(
    forward: Callable[[], object], exclude: Iterable[Tensor] = ()
) -> tuple[int, object]:
    """Run ``forward()`` and return ``(bytes, its result)``: the bytes of every distinct storage
    that autograd saved for backward during the call, each counted once, leaving out the
    storages of ``exclude`` (typically the parameters and the input).

    Storages are told apart by their data pointer, which stays unique because the graph keeps
    every saved tensor alive as long as the returned result is alive.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            seen.setdefault(ptr, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(seen.values()), result
