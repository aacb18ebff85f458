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

The row-parallel projection after such a norm stays fused with it through the op families'
sharded-norm entry points (docs/design.md, The op contract): ``norm_stats`` (this shard's
partials), ``ln_linear`` with the reduced (mean, rstd) given; backward
``ln_linear_backward_partial`` (dweight, dh and this shard's row sums), the all-reduce, then
``layer_norm_backward`` with the reduced row means (dx, dgamma, dbeta). Nothing normalised is
written in full.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

import magneto_kernels
from magneto_kernels import checks, reference
from magneto_kernels.backends import FAMILY, resolve_backend
from magneto_kernels.codes import ACTIVATION_ALIASES
from magneto_kernels.library import get_op
from magneto_kernels.quant import OFFLINE_MODES, bitnet_norm

_LOGS: list[list[tuple[str, int]]] = []


@contextlib.contextmanager
def communication_log():
    """The collectives tensor parallelism runs inside the block, as a list of (name, payload
    bytes per rank) filled as they run: "all_reduce" (wire bytes per rank on a ring:
    2·(world−1)/world · payload), "all_gather" (this rank's part; (world−1) · payload) or
    "reduce_scatter" (this rank's part of the output; (world−1) · payload)."""
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


def _norm_forward(x, weight, bias, eps, norm, group):
    """(N(x) in x's dtype, mean or None for RMSNorm, rstd): the statistics over every rank."""
    xf = x.to(_compute_dtype(x))
    k = xf.shape[-1]
    if norm == "layer":
        local_mean = xf.mean(-1)
        local_m2 = (xf - local_mean.unsqueeze(-1)).square().sum(-1)
        gathered = _all_gather(torch.stack([local_mean, local_m2]), group)
        mean, m2 = chan_combine(gathered[:, 0], gathered[:, 1], k)
    else:
        m2 = xf.square().sum(-1)
        _all_reduce(m2, group)
        mean = None
    rstd = torch.rsqrt(m2 / (k * dist.get_world_size(group)) + eps)
    return _normalize(x, weight, bias, mean, rstd), mean, rstd


def _normalize(x, weight, bias, mean, rstd):
    xf = x.to(_compute_dtype(x))
    xc = xf if mean is None else xf - mean.unsqueeze(-1)
    y = xc * rstd.unsqueeze(-1) * weight.to(xf.dtype)
    return (y if bias is None else y + bias.to(xf.dtype)).to(x.dtype)


def _norm_backward(x, weight, mean, rstd, dy, group, has_bias):
    """(dx, dweight, dbias or None) of the sharded norm: two row sums all-reduced (one for
    RMSNorm); dweight and dbias this rank's own."""
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
    _all_reduce(sums, group)
    sums = sums / (xf.shape[-1] * dist.get_world_size(group))
    if mean is None:
        dx = rstd.unsqueeze(-1) * (g - xhat * sums[..., :1])
    else:
        dx = rstd.unsqueeze(-1) * (g - sums[..., :1] - xhat * sums[..., 1:])
    rows = tuple(range(dy.dim() - 1))
    dweight = (dyf * xhat).sum(rows).to(weight.dtype)
    dbias = dyf.sum(rows).to(weight.dtype) if has_bias else None
    return dx.to(x.dtype), dweight, dbias


class _ShardedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, norm, group):
        y, mean, rstd = _norm_forward(x, weight, bias, eps, norm, group)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias, ctx.group = bias is not None, group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _norm_backward(x, weight, mean, rstd, dy, ctx.group, ctx.has_bias)
        return dx, dweight, dbias, None, None, None


def _entry_points(backend: str):
    """(norm_stats, ln_linear, ln_linear_backward_partial, layer_norm_backward) of backend's
    family, each taking its op's arguments in schema order: the reference functions (checked as
    ops.py checks them) or the family's torch.library ops."""
    if backend == "reference":
        return (
            lambda *a: reference.norm_stats(*checks.norm_stats(*a, reference=True)),
            lambda *a: magneto_kernels.ops._ln_linear_reference(*a)[0],
            lambda *a: reference.ln_linear_backward_partial(
                *checks.ln_linear_backward_partial(*a, reference=True)
            ),
            lambda *a: reference.layer_norm_backward(
                *checks.layer_norm_backward(*a, reference=True)
            ),
        )
    family = FAMILY[backend]
    names = ("norm_stats", "ln_linear", "ln_linear_backward_partial", "layer_norm_backward")
    ops = [get_op(name, family) for name in names]
    return ops[0], lambda *a: ops[1](*a)[0], ops[2], ops[3]


def _reduced_stats(local_mean, local_m2, count, eps, norm, group):
    """(mean, rstd) of rows split over ``group`` from each rank's (mean, M2) of its ``count``
    features: an all-gather and Chan's combine (LayerNorm), or an all-reduce of the sums of
    squares (RMSNorm; mean stays empty)."""
    if norm == "layer":
        gathered = _all_gather(torch.stack([local_mean, local_m2]), group)
        mean, m2 = chan_combine(gathered[:, 0], gathered[:, 1], count)
    else:
        mean, m2 = local_mean, local_m2.contiguous()
        _all_reduce(m2, group)
    return mean, torch.rsqrt(m2 / (count * dist.get_world_size(group)) + eps)


def whole_weight_scale(weight: Tensor, numel: int, group) -> Tensor:
    """BitNet's online weight scale of a weight sharded over ``group`` (this rank's shard): the
    whole weight's mean|W|, (1,) float32, from one all-reduce of this shard's Σ|W|. No gradient
    (the weight quantisation is straight-through)."""
    total = weight.detach().float().abs().sum().reshape(1)
    _all_reduce(total, group)
    return total / numel


def _row_amax(x, ln_weight, eps, act, rstd, group) -> Tensor:
    """max|h| of each row over every shard, (rows,) float32: this shard's h formed as the
    quantised op forms it (``bitnet_norm`` on the reduced rstd), one all-reduce (MAX)."""
    h = bitnet_norm(reference.apply_input_activation(x, act), ln_weight, eps, rstd)
    amax = h.detach().float().abs().amax(-1).reshape(-1).contiguous()
    _all_reduce(amax, group, dist.ReduceOp.MAX)
    return amax


class _RowParallelNormLinear(torch.autograd.Function):
    """``N(in_act(x)) @ weight^T`` with N over every rank's features (this rank's partial
    product), through the family's sharded-norm entry points: the statistics' partials, one
    collective, the fused op on the reduced statistics; backward the op's first half, one
    all-reduce of the row sums, the norm's backward. Saves x, the weights and the row
    statistics. BitNet's quantised projection (``quant``): h's per-row max over every shard
    (one all-reduce, MAX) and, online, the whole weight's scale (one all-reduce of one float)
    are given to the op too, and saved."""

    @staticmethod
    def forward(
        ctx, x, ln_weight, ln_bias, weight, eps, norm, input_activation, group, backend, quant,
        weight_scale, numel,
    ):  # fmt: skip
        act = ACTIVATION_ALIASES.get(input_activation, input_activation)  # the ops check it
        norm_stats, ln_linear, _, _ = ctx.entry_points = _entry_points(backend)
        local_mean, local_m2 = norm_stats(x, norm, act)
        count = weight.shape[1] * (4 if quant in OFFLINE_MODES else 1)
        mean, rstd = _reduced_stats(local_mean, local_m2, count, eps, norm, group)
        row_amax = None
        if quant != "none":
            row_amax = _row_amax(x, ln_weight, eps, act, rstd, group)
            if quant == "bitnet_online":
                weight_scale = whole_weight_scale(weight, numel, group)
        ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd, weight_scale, row_amax)
        ctx.group, ctx.norm, ctx.input_activation, ctx.count = group, norm, act, count
        ctx.quant = quant
        return ln_linear(
            x, ln_weight, ln_bias, weight, None, None, None, eps, norm, act, "none", 1.0, 0.0,
            quant, weight_scale, mean, rstd, row_amax,
        )  # fmt: skip

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, ln_weight, ln_bias, weight, mean, rstd, weight_scale, row_amax = ctx.saved_tensors
        _, _, backward_partial, norm_backward = ctx.entry_points
        need = ctx.needs_input_grad
        dh, row_sums, dweight, _ = backward_partial(
            dout.contiguous(), x, ln_weight, ln_bias, weight, mean, rstd, x.new_empty((0,)),
            None, ctx.norm, ctx.input_activation, "none", 0.0, [True, need[3], False], ctx.quant,
            weight_scale, row_amax,
        )  # fmt: skip
        _all_reduce(row_sums, ctx.group)
        row_means = row_sums / (ctx.count * dist.get_world_size(ctx.group))
        dx, dln_weight, dln_bias = norm_backward(
            dh, x, ln_weight, ln_bias, mean, rstd, None, ctx.norm, [need[0], need[1], need[2]],
            ctx.input_activation, row_means,
        )  # fmt: skip
        grads = (dx, dln_weight, dln_bias, dweight)
        grads = tuple(g if wanted else None for g, wanted in zip(grads, need))
        return (*grads, *[None] * 8)


def row_parallel_norm_linear(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Optional[Tensor],
    weight: Tensor,
    eps: float,
    norm: str,
    input_activation: Optional[str],
    group,
    backend: Optional[str] = None,
    *,
    quant: str = "none",
    weight_scale: Optional[Tensor] = None,
    numel: int = 0,
) -> Tensor:
    """This rank's partial ``N(in_act(x)) @ weight^T`` of a row-parallel projection, the norm
    over features split across ``group`` (as ``sharded_norm``); x, weight and the row statistics
    are all it keeps for backward. ``quant``: BitNet's quantised projection (``ln_linear``'s
    modes; RMSNorm), ``weight_scale`` the offline modes' stored scale, ``numel`` the whole
    weight's element count (online: its scale is the whole weight's mean|W|)."""
    if quant != "none" and norm != "rms":
        raise ValueError(f"quant={quant!r} takes norm='rms' (BitNet's sub-norm), got {norm!r}")
    return _RowParallelNormLinear.apply(
        x, ln_weight, ln_bias, weight, float(eps), norm, input_activation, group,
        resolve_backend(backend, x), quant, weight_scale, numel,
    )  # fmt: skip


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


def vocab_parallel_argmax(logits: Tensor, group) -> Tensor:
    """The whole vocabulary's argmax of logits split in equal consecutive blocks over ``group``
    (the first one on ties, as ``argmax``): one all-gather of (max, index) per row."""
    best, index = logits.float().max(-1)
    index = index + dist.get_rank(group) * logits.shape[-1]
    gathered = _all_gather(torch.stack([best, index.float()]), group)  # (world, 2, *rows)
    rank = gathered[:, 0].argmax(0, keepdim=True)
    return gathered[:, 1].gather(0, rank).squeeze(0).long()
