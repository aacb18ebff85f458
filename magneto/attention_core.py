"""The attention core, ``softmax(q·kᵀ/√d + mask)·v``, on the path that is fastest where it runs.

Three paths compute it:
- ``"sdpa"``: ``F.scaled_dot_product_attention`` (torch's flash / memory-efficient kernels;
  on CPU its flash-attention kernel);
- ``"math"``: two batched GEMMs around a float32 softmax, in q's dtype otherwise;
- ``"widened"`` (bf16/fp16 only): ``"sdpa"`` on float32 copies of q, k, v (and of a float
  mask), its output rounded once to q's dtype. A CPU without bf16/fp16 arithmetic (AVX2) runs
  torch's flash kernel in those dtypes through generic conversions, several times slower than
  in float32.

Which is faster depends on the CPU, the dtype and the shape, not on a rule one can write down:
torch's CPU flash-attention kernel wins on an Intel Sapphire Rapids at every size measured in
bf16 and fp32, where on an AMD EPYC Zen 5 it takes 1.9 ms for one bf16 query row over 257 cached
keys and the two GEMMs 0.22 ms, and on a Zen 3 its bf16 forward and backward takes 4× its float32
one (docs/design.md, Decisions: attention path). So the choice is measured, once per process
and per key — device, dtype, head width, query length and key length (each rounded up to a
power of two), mask kind, causal, training (a gradient recorded, or attention dropout) —, on the
call's own tensors: each path runs three times, alternately (a training call's forward and
backward), and the fastest minimum wins.

A call recording a gradient, or with attention dropout, chooses between ``"sdpa"`` and
``"widened"`` only: the math path would keep the (query x key) probabilities per head for its
backward, where SDPA recomputes them (``"widened"`` keeps float32 copies of q, k, v and the
output, twice the bytes of SDPA's). In float32, and on CUDA (its flash kernels), there is one
candidate, ``"sdpa"``, and nothing is timed.

Under ``torch.compile`` nothing is timed (it would break the graph): a traced call takes the
path measured eagerly for its key, else ``"sdpa"``. ``MAGNETO_ATTENTION`` (``sdpa``, ``math``,
``widened`` or ``auto``, the default) or ``force_path`` pins the path for every call, as tests
and reproducible runs need: the paths round differently (bf16: each within bf16 rounding of
float64; tests/test_attention_core.py); ``widened`` on a float32 call runs ``sdpa``.
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
    """Every attention core inside the block runs ``name`` (one of ``PATHS``; None: the
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
    key length bucket, mask kind, causal, training) -> path."""
    return dict(_chosen)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask, causal: bool, dropout_p: float) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p
    )


_WIDENED = (torch.bfloat16, torch.float16)


def _widened(q: Tensor, k: Tensor, v: Tensor, mask, causal: bool, dropout_p: float) -> Tensor:
    """SDPA on float32 copies (the top of the file); a float32 call is SDPA itself."""
    if q.dtype not in _WIDENED:
        return _sdpa(q, k, v, mask, causal, dropout_p)
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    return _sdpa(q.float(), k.float(), v.float(), mask, causal, dropout_p).to(q.dtype)


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


_PATH_FNS = {"sdpa": _sdpa, "math": _math, "widened": _widened}
PATHS = tuple(_PATH_FNS)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _key(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool, training: bool) -> tuple:
    kind = "none" if mask is None else "bool" if mask.dtype == torch.bool else "float"
    return (
        q.device.type, q.dtype, q.shape[-1], _bucket(q.shape[-2]), _bucket(k.shape[-2]), kind,
        causal, training,
    )  # fmt: skip


def _candidates(q: Tensor, training: bool) -> tuple[str, ...]:
    """The paths a call may take (the top of the file); training: recording a gradient, or with
    attention dropout."""
    if q.device.type != "cpu":
        return ("sdpa",)
    return (
        ("sdpa",) + (("widened",) if q.dtype in _WIDENED else ()) + (() if training else ("math",))
    )


def _run(path: str, q: Tensor, k: Tensor, v: Tensor, mask, causal: bool, dropout_p: float):
    return _PATH_FNS[path](q, k, v, mask, causal, dropout_p)


def _measure(q: Tensor, k: Tensor, v: Tensor, mask, causal: bool, paths, backward: bool) -> str:
    """The fastest of paths on these tensors, without dropout; ``backward``: forward and
    backward (into the leaves that require a gradient, detached copies, so that nothing reaches
    the caller's)."""
    leaves = []
    if backward:
        q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        mask = mask.detach() if mask is not None else None
        leaves = [t for t in (q, k, v) if t.requires_grad]

    def timed(path: str) -> None:
        if not leaves:
            with torch.no_grad():
                _run(path, q, k, v, mask, causal, 0.0)
            return
        out = _run(path, q, k, v, mask, causal, 0.0)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    best = {name: math.inf for name in paths}
    # The timing's own saved tensors go to these identity hooks, not to a caller's (a memory
    # profiler's hooks, magneto.profiling.saved_tensor_bytes, would count them as the call's).
    with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
        for _ in range(3):
            for name in paths:
                start = time.perf_counter()
                timed(name)
                best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def _unchanged(t: Tensor) -> Tensor:
    return t


def path_for(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, dropout_p: float
) -> str:
    """The path a call with these tensors takes (the top of the file), measuring it if needed."""
    path = pinned()
    if path is not None:
        return path
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mask)
    )
    training = grad or dropout_p > 0.0
    paths = _candidates(q, training)
    if len(paths) == 1:
        return paths[0]
    key = _key(q, k, mask, causal, training)
    if torch.compiler.is_compiling():
        # no timing inside a trace (a graph break): the choice measured eagerly, else SDPA
        return _chosen.get(key, "sdpa")
    if key not in _chosen:
        _chosen[key] = _measure(q, k, v, mask, causal, paths, grad)
    return _chosen[key]


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
    return _run(path_for(q, k, v, mask, causal, dropout_p), q, k, v, mask, causal, dropout_p)
