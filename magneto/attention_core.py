"""The attention core, ``softmax(q·kᵀ/√d + mask)·v``, on the path that is fastest where it runs.

Two paths compute it:
- ``"sdpa"``: ``F.scaled_dot_product_attention`` (torch's flash / memory-efficient kernels;
  on CPU its flash-attention kernel);
- ``"math"``: two batched GEMMs around a float32 softmax, in q's dtype otherwise.

Which is faster depends on the CPU, the dtype and the shape, not on a rule one can write down:
torch's CPU flash-attention kernel wins on an Intel Sapphire Rapids at every size measured in
bf16 and fp32, where on an AMD EPYC Zen 5 it takes 1.9 ms for one bf16 query row over 257 cached
keys and the two GEMMs 0.22 ms (docs/design.md, Decisions: attention path). So the choice is
measured, once per process and per key — device, dtype, head width, query length and key length
(each rounded up to a power of two), mask kind, causal —, on the call's own tensors: each path
runs three times, alternately, and the faster minimum wins.

Under ``torch.compile`` nothing is timed (it would break the graph): a traced call takes the
path measured eagerly for its key, else ``"sdpa"``.

Only inference calls are measured (no gradient recorded, no attention dropout): a training call
takes ``"sdpa"``, whose backward recomputes the probabilities where the math path would keep the
(query x key) matrix per head; CUDA takes ``"sdpa"`` (its flash kernels). ``MAGNETO_ATTENTION``
(``sdpa``, ``math`` or ``auto``, the default) or ``force_path`` pins the path for every call, as
tests and reproducible runs need: the paths round differently (bf16: both within bf16 rounding
of float64; tests/test_attention_core.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from magneto import masks

PATHS = ("sdpa", "math")
ENV_VAR = "MAGNETO_ATTENTION"
_forced: Optional[str] = None
_chosen: dict[tuple, str] = {}


def pinned() -> Optional[str]:
    """The path every call takes (``force_path``, else ``MAGNETO_ATTENTION``), None for auto."""
    name = _forced if _forced is not None else os.environ.get(ENV_VAR, "auto")
    if name == "auto":
        return None
    if name not in PATHS:
        raise ValueError(f"{ENV_VAR} must be one of {PATHS} or 'auto', got {name!r}")
    return name


@contextlib.contextmanager
def force_path(name: Optional[str]) -> Iterator[None]:
    """Every attention core inside the block runs ``name`` (``"sdpa"`` or ``"math"``; None: the
    measured choice)."""
    global _forced
    if name is not None and name not in PATHS:
        raise ValueError(f"attention path must be one of {PATHS} or None, got {name!r}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def chosen_paths() -> dict[tuple, str]:
    """The measured choices so far: key (device type, dtype, head width, query length bucket,
    key length bucket, mask kind, causal) -> path."""
    return dict(_chosen)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask, causal: bool, dropout_p: float) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p
    )


def _math(q: Tensor, k: Tensor, v: Tensor, mask, causal: bool, dropout_p: float) -> Tensor:
    """softmax(q·kᵀ/√d + mask)·v as SDPA defines it, a row with every key masked giving 0 (as
    SDPA's kernels do) and a NaN score giving NaN; dropout on the probabilities (torch's
    generator, not SDPA's mask). The scores are GEMM outputs in q's dtype (float32
    accumulation), the softmax float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k.transpose(-1, -2)).to(dtype) * (1.0 / math.sqrt(q.shape[-1]))
    scores = masks.masked_scores(scores, mask, causal)
    top = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(top == float("-inf"), 0.0, top))
    # every key masked: p is all zero and the sum clamps to 1; otherwise the sum is >= 1 already
    p = p / p.sum(-1, keepdim=True).clamp(min=1.0)
    return F.dropout(p, dropout_p).to(v.dtype) @ v


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _key(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool) -> tuple:
    kind = "none" if mask is None else "bool" if mask.dtype == torch.bool else "float"
    return (
        q.device.type, q.dtype, q.shape[-1], _bucket(q.shape[-2]), _bucket(k.shape[-2]), kind,
        causal,
    )  # fmt: skip


def _measure(q: Tensor, k: Tensor, v: Tensor, mask, causal: bool) -> str:
    runs = {
        "sdpa": lambda: _sdpa(q, k, v, mask, causal, 0.0),
        "math": lambda: _math(q, k, v, mask, causal, 0.0),
    }
    best = {name: math.inf for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def path_for(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, dropout_p: float
) -> str:
    """The path a call with these tensors takes (the top of the file), measuring it if needed."""
    path = pinned()
    if path is not None:
        return path
    if (
        q.device.type != "cpu"
        or dropout_p > 0.0
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    ):
        return "sdpa"
    key = _key(q, k, mask, causal)
    if torch.compiler.is_compiling():
        # no timing inside a trace (a graph break): the choice measured eagerly, else SDPA
        return _chosen.get(key, "sdpa")
    return _chosen.get(key) or _chosen.setdefault(key, _measure(q, k, v, mask, causal))


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
    dropout_p=dropout_p)`` (q: (batch, heads, tgt, head_dim); k, v: (batch, heads, src,
    head_dim); mask as ``masks.sdpa_mask`` gives it) on the path ``path_for`` picks."""
    if path_for(q, k, v, mask, causal, dropout_p) == "sdpa":
        return _sdpa(q, k, v, mask, causal, dropout_p)
    return _math(q, k, v, mask, causal, dropout_p)
