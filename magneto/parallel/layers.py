"""A rank's shards of the projections and inner norms a tensor-parallel block is made of.

Each module keeps this rank's slice of the whole parameter (a plain tensor, so FSDP2 shards it
further over a data-parallel mesh) and what is needed to put it back: ``shard_dim`` (the
dimension of the whole parameter it slices), ``shard_index`` (the indices it keeps there) and
``shard_view`` (how the whole parameter is viewed so that the slice is one block of one
dimension: the packed q/k/v weight (3·d, d) as (3, d, d), its slice of heads (3, d/world, d)),
read by ``magneto.parallel.checkpoint``.

``parallel_project`` is what ``magneto.fusion.project`` calls instead of fusing the module itself:
a column-parallel shard is one fused ``ln_linear`` (input norm and all) on the replicated input,
a row-parallel shard the sharded norm, a partial ``ln_linear`` and one all-reduce.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import magneto_kernels
from magneto.fusion import norm_arguments
from magneto.parallel.functional import (
    copy_to_parallel,
    reduce_from_parallel,
    row_parallel_norm_linear,
    sharded_norm,
)
from magneto.parallel.sequence import active, deferred, row_output


def _shard(param: Optional[Tensor], dim: int, index: Tensor) -> Optional[nn.Parameter]:
    if param is None:
        return None
    local = param.detach().index_select(dim, index.to(param.device)).clone()
    return nn.Parameter(local, requires_grad=param.requires_grad)


class _Shard(nn.Module):
    def _keep(self, dim: int, index: Tensor, view: tuple[int, ...], group) -> None:
        self.shard_dim, self.group = dim, group
        self.register_buffer("shard_index", index, persistent=False)
        self.shard_view = view


class ColumnParallelLinear(_Shard):
    """This rank's output rows ``index`` of ``linear`` (``nn.Linear``); the input is replicated."""

    def __init__(self, linear: nn.Linear, index: Tensor, view: tuple[int, ...], group):
        super().__init__()
        self.weight = _shard(linear.weight, 0, index)
        self.bias = _shard(linear.bias, 0, index)
        self.in_features, self.out_features = linear.in_features, index.numel()
        self._keep(0, index, view, group)

    def _input(self, x: Tensor) -> Tensor:
        """x as the GEMM reads it: in a sequence-parallel layer already gathered (the gather's
        backward reduce-scatters its gradient), else replicated (its gradient all-reduced)."""
        return x if active() is self.group else copy_to_parallel(x, self.group)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._input(x), self.weight, self.bias)

    def parallel_project(
        self, x, norm, *, input_activation, residual, alpha, dropout_p, rows, backend
    ) -> Tensor:
        """One fused ``ln_linear`` with this rank's rows; x and a fused input norm's parameters
        (replicated) get their gradients summed over the ranks."""
        if residual is not None or dropout_p > 0.0:
            raise ValueError("a column-parallel projection has no residual add or dropout")
        args = norm_arguments(norm, x)
        if args is None:
            raise ValueError(f"tensor parallelism cannot fuse the norm {type(norm).__name__}")
        weight, bias = self.weight, self.bias
        if rows is not None:
            weight, bias = weight[rows], None if bias is None else bias[rows]
        return magneto_kernels.ln_linear(
            self._input(x),
            weight=weight,
            bias=bias,
            input_activation=input_activation,
            backend=backend,
            **self._norm(**args),
        )

    def _norm(self, ln_weight, ln_bias, **rest) -> dict:
        """The fused input norm's arguments (``eps``, ``norm`` in ``rest``), its weight and bias
        (replicated) passed through ``copy_to_parallel``: their gradients are summed over the
        ranks."""
        ln_weight, ln_bias = (copy_to_parallel(t, self.group) for t in (ln_weight, ln_bias))
        return {"ln_weight": ln_weight, "ln_bias": ln_bias, **rest}


def column_parallel_group(x, ln_weight, ln_bias, eps, norm, shards, backend=None) -> list:
    """``[shard(N(x)) for shard in shards]`` for column-parallel shards over one group as one
    ``ln_linear_group`` (x normalised once, its gradient summed inside the op, then over the
    ranks by one collective for the whole group)."""
    first = shards[0]
    if any(s.group is not first.group for s in shards):
        raise ValueError("column_parallel_group: the shards are not over one group")
    return magneto_kernels.ln_linear_group(
        first._input(x),
        weights=[s.weight for s in shards],
        biases=[s.bias for s in shards],
        backend=backend,
        **first._norm(ln_weight, ln_bias, eps=eps, norm=norm),
    )


class ShardedNorm(_Shard):
    """This rank's features ``index`` of a norm (``weight``, ``bias``, ``eps``, ``norm``: the
    whole norm's) whose rows span the ranks."""

    def __init__(self, weight, bias, eps: float, norm: str, index: Tensor, group):
        super().__init__()
        self.weight = _shard(weight, 0, index)
        self.bias = _shard(bias, 0, index)
        self.eps, self.norm = eps, norm
        self._keep(0, index, (weight.shape[0],), group)

    @classmethod
    def of(cls, module: nn.Module, index: Tensor, group) -> "ShardedNorm":
        """The shard of a norm module ``magneto.fusion`` recognises, or of a Hugging Face
        RMSNorm (``weight`` and ``variance_epsilon``)."""
        if hasattr(module, "variance_epsilon") and not hasattr(module, "bias"):
            return cls(module.weight, None, module.variance_epsilon, "rms", index, group)
        args = norm_arguments(module, module.weight.new_empty(0))
        if args is None:
            raise ValueError(f"tensor parallelism cannot shard the norm {type(module).__name__}")
        return cls(args["ln_weight"], args["ln_bias"], args["eps"], args["norm"], index, group)

    def forward(self, x: Tensor) -> Tensor:
        return sharded_norm(x, self.weight, self.bias, self.eps, self.norm, self.group)


class RowParallelLinear(_Shard):
    """This rank's input columns ``index`` of ``linear``; the output is summed over the ranks
    and the bias (replicated) added once after the sum."""

    def __init__(self, linear: nn.Linear, index: Tensor, view: tuple[int, ...], group):
        super().__init__()
        self.weight = _shard(linear.weight, 1, index)
        self.bias = linear.bias
        self.in_features, self.out_features = index.numel(), linear.out_features
        self._keep(1, index, view, group)

    def forward(self, x: Tensor) -> Tensor:
        return self._output(F.linear(x, self.weight), 0.0)

    def _output(self, partial: Tensor, dropout_p: float) -> Tensor:
        """``dropout(sum over ranks(partial) + bias)``: all-reduced, or reduce-scattered to
        this rank's rows in a sequence-parallel layer."""
        if active() is self.group:
            if deferred():  # the multiway layer adds the bias after its reduce-scatter
                return partial
            return row_output(partial, self.bias, dropout_p, self.group)
        y = reduce_from_parallel(partial, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y if dropout_p == 0.0 else magneto_kernels.dropout(y, dropout_p)

    def parallel_project(
        self, x, norm, *, input_activation, residual, alpha, dropout_p, rows, backend
    ) -> Tensor:
        """``alpha·residual + dropout(sum over ranks(W_r · N(in_act(x_r))) + b)``; the dropout
        mask is drawn from torch's generator, which must be in the same state on every rank of
        the group (as a one-process run's)."""
        if rows is not None:
            raise ValueError("a row-parallel projection has no packed outputs")
        if norm is None:
            partial = magneto_kernels.ln_linear(
                x, None, None, self.weight, input_activation=input_activation, backend=backend
            )
        elif isinstance(norm, ShardedNorm):
            partial = row_parallel_norm_linear(
                x,
                norm.weight,
                norm.bias,
                self.weight,
                norm.eps,
                norm.norm,
                input_activation,
                self.group,
                backend,
            )
        else:
            raise ValueError("the norm before a row-parallel projection must be sharded")
        y = self._output(partial, dropout_p)
        return y if residual is None else alpha * residual + y


def shard_of(model: nn.Module, name: str) -> Optional[tuple[int, Tensor]]:
    """(dimension, indices) of the whole parameter ``name`` that this rank's ``name`` holds, or
    None for a replicated one: ``whole.index_select(*shard_of(model, name))`` is the slice."""
    module = model.get_submodule(name.rpartition(".")[0])
    if not isinstance(module, _Shard) or (name.endswith("bias") and module.shard_dim == 1):
        return None
    return (module.shard_dim if name.endswith("weight") else 0), module.shard_index


def head_rows(heads: int, head_dim: int, packed: int, rank: int, world: int) -> Tensor:
    """The rows of a projection packing ``packed`` blocks of ``heads`` heads (q, k, v: 3) that
    hold this rank's heads, block by block."""
    local = heads // world * head_dim
    width = heads * head_dim
    starts = [b * width + rank * local for b in range(packed)]
    return torch.cat([torch.arange(start, start + local) for start in starts])


class VocabParallelEmbedding(_Shard):
    """This rank's rows ``index`` (one consecutive block of the vocabulary) of an
    ``nn.Embedding``: tokens outside the block give zeros, and one all-reduce sums the ranks'
    rows into every token's embedding."""

    def __init__(self, embedding: nn.Embedding, index: Tensor, group):
        super().__init__()
        self.weight = _shard(embedding.weight, 0, index)
        self.start, self.num_embeddings = int(index[0]), embedding.num_embeddings
        pad = embedding.padding_idx
        self.padding_idx = None
        if pad is not None and self.start <= pad < self.start + index.numel():
            self.padding_idx = pad - self.start
        self._keep(0, index, tuple(embedding.weight.shape), group)

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight, self.padding_idx)
        return reduce_from_parallel(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.group)
