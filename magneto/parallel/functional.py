"""The collectives of tensor parallelism, as autograd functions: the two Megatron conjugates
(copy into the tensor-parallel region, sum out of it) and the norm over features sharded across
ranks (docs/design.md, Tensor parallelism).

Sharded norm, per row of x (k features on this rank, n = k·world in all):

- forward, LayerNorm: each rank computes its partial (mean, M2) (M2 the sum of squared
  deviations from its own mean); one all-gather of these 2 floats per row; every rank combines
  them in rank order with Chan's formula (the same floats on every rank). Not sum / sum of
  squares: ``E[x²] − E[x]²`` cancels when |mean| ≫ std (at |mean|/std = 1e3 fp32 keeps no digit
  of the variance), and Chan's combine is not a sum, so it cannot ride an all-reduce: an all-reduce
  of (n·mean, M2, n·mean²) would bring the cancellation back. RMSNorm: one all-reduce of the
  row's sum of squares (1 float per row; no cancellation, every term is positive).
- backward: with g = dy·weight and xhat the normalised input, ``dx = rstd·(g − mean(g) −
  xhat·mean(g·xhat))``: the two row sums (one for RMSNorm, which has no mean) are all-reduced;
  dweight and dbias stay local to the shard.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

_LOGS: list[list[tuple[str, int]]] = []


@contextlib.contextmanager
def communication_log():
    """The collectives tensor parallelism runs inside the block, as a list of (name, payload
    bytes per rank) filled as they run: "all_reduce" (wire bytes per rank on a ring:
    2·(world−1)/world · payload) or "all_gather" (this rank's part; (world−1) · payload)."""
    log: list[tuple[str, int]] = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _all_reduce(x: Tensor, group, op=dist.ReduceOp.SUM) -> None:
    for log in _LOGS:
        log.append(("all_reduce", x.numel() * x.element_size()))
    dist.all_reduce(x, op=op, group=group)


def _all_gather(x: Tensor, group) -> Tensor:
    """(world, *x.shape): every rank's x, in rank order."""
    for log in _LOGS:
        log.append(("all_gather", x.numel() * x.element_size()))
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out.view(world, *x.shape)


class _CopyToParallel(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient (each rank holds a partial one)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy: Tensor):
        dy = dy.contiguous().clone()
        _all_reduce(dy, ctx.group)
        return dy, None


class _ReduceFromParallel(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (every rank needs the whole gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous().clone()
        _all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy, None


def copy_to_parallel(x: Optional[Tensor], group) -> Optional[Tensor]:
    """x as it enters a column-parallel projection: its gradient is summed over ``group``."""
    return None if x is None else _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: Tensor, group) -> Tensor:
    """The sum of a row-parallel projection's partial outputs over ``group``."""
    return _ReduceFromParallel.apply(x, group)


def chan_combine(mean: Tensor, m2: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(mean, M2) of the union of ``world`` equal parts of ``count`` elements each, from their
    (world, rows) partial means and M2s: Chan, Golub and LeVeque's pairwise update, in part
    order (so every rank computes the same floats)."""
    mean_a, m2_a, n_a = mean[0], m2[0], count
    for mean_b, m2_b in zip(mean[1:], m2[1:]):
        n = n_a + count
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (count / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * count / n)
        n_a = n
    return mean_a, m2_a


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # the ops' numerics


class _ShardedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, norm, group):
        world = dist.get_world_size(group)
        xf = x.to(_compute_dtype(x))
        k = xf.shape[-1]
        n = k * world
        if norm == "layer":
            local_mean = xf.mean(-1)
            local_m2 = (xf - local_mean.unsqueeze(-1)).square().sum(-1)
            gathered = _all_gather(torch.stack([local_mean, local_m2]), group)
            mean, m2 = chan_combine(gathered[:, 0], gathered[:, 1], k)
            xc = xf - mean.unsqueeze(-1)
        else:
            m2 = xf.square().sum(-1)
            _all_reduce(m2, group)
            mean, xc = None, xf
        rstd = torch.rsqrt(m2 / n + eps)
        y = xc * rstd.unsqueeze(-1) * weight.to(xf.dtype)
        if bias is not None:
            y = y + bias.to(xf.dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias, ctx.group, ctx.n = bias is not None, group, n
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        xf = x.to(_compute_dtype(x))
        xc = xf if mean is None else xf - mean.unsqueeze(-1)
        xhat = xc * rstd.unsqueeze(-1)
        dyf = dy.to(xf.dtype)
        g = dyf * weight.to(xf.dtype)
        if mean is None:
            sums = (g * xhat).sum(-1, keepdim=True)
        else:
            sums = torch.stack([g.sum(-1), (g * xhat).sum(-1)], -1)
        sums = sums.contiguous()
        _all_reduce(sums, ctx.group)
        sums = sums / ctx.n
        if mean is None:
            dx = rstd.unsqueeze(-1) * (g - xhat * sums[..., :1])
        else:
            dx = rstd.unsqueeze(-1) * (g - sums[..., :1] - xhat * sums[..., 1:])
        rows = tuple(range(dy.dim() - 1))
        dweight = (dyf * xhat).sum(rows).to(weight.dtype)
        dbias = dyf.sum(rows).to(weight.dtype) if ctx.has_bias else None
        return dx.to(x.dtype), dweight, dbias, None, None, None


def sharded_norm(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    eps: float,
    norm: str,
    group,
) -> Tensor:
    """LayerNorm (``norm="layer"``) or RMSNorm (``"rms"``) of rows whose features are split in
    equal, consecutive shards over ``group`` (this rank's shard x, weight and bias)."""
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape {tuple(x.shape[-1:])}, got {tuple(weight.shape)}")
    return _ShardedNorm.apply(x, weight, bias, float(eps), norm, group)


def vocab_parallel_cross_entropy(
    logits: Tensor, target: Tensor, group, ignore_index: int = -100
) -> Tensor:
    """Mean cross entropy of logits whose vocabulary is split in equal consecutive blocks over
    ``group`` (this rank's block; ``target`` the whole vocabulary's ids), without gathering the
    logits: three all-reduces of one float per row (the max, the sum of exponentials, the
    target's logit). Every rank gets the same loss; the gradients reach each rank's block."""
    rank, vocab = dist.get_rank(group), logits.shape[-1]
    logits = logits.float()
    shift = logits.detach().amax(-1)
    _all_reduce(shift, group, dist.ReduceOp.MAX)
    shifted = logits - shift.unsqueeze(-1)
    sum_exp = reduce_from_parallel(shifted.exp().sum(-1), group)
    local = target - rank * vocab
    inside = (local >= 0) & (local < vocab)
    picked = shifted.gather(-1, local.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = reduce_from_parallel(picked * inside, group)
    keep = target != ignore_index
    loss = (sum_exp.log() - target_logit) * keep
    return loss.sum() / keep.sum()
