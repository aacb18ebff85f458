"""The tensor-parallel plan of Hugging Face's Sub-LN families and Llama: BitNet (dense
projections), Kosmos-2's text model, Llama; patched by ``apply_magneto`` or not.

Per decoder layer: q_proj, k_proj, v_proj column-parallel by heads (grouped-query attention: the
key/value heads split like the query heads, so a rank's query heads read its own key/value
heads), o_proj / out_proj row-parallel; gate_proj and up_proj (or fc1) column-parallel,
down_proj (or fc2) row-parallel; the sub-norms (BitNet's ``attn_sub_norm`` and
``ffn_sub_norm``, Kosmos-2's ``inner_attn_ln`` and ``ffn_layernorm``) sharded with the features
they normalise. Unpatched, the attention and MLP forwards need no change: they reshape with
``-1`` heads and call the projection and norm modules, which are the shards. Patched by
``apply_magneto``, the integration fuses the shards as it fuses ``nn.Linear``: a group of
column-parallel shards (q/k/v, gate/up) through ``ColumnParallelProjection`` (its adapter, one
``ln_linear_group`` with the outer norm), a row-parallel one (o_proj, down_proj, fc2) through
its ``parallel_project`` (the sharded sub-norm, the input activation, one all-reduce, the
residual add). transformers' own ``tp_plan`` (DTensor parameters behind hooks) composes with
``apply_magneto`` the other way: its projections run as its modules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from magneto.fusion import has_hooks
from magneto.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedNorm,
    column_parallel_group,
    head_rows,
)
from magneto.parallel.plan import _group

_ATTENTION = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj", "out_proj"),
    ("attn_sub_norm", "inner_attn_ln"),
)
_MLP = (("gate_proj", "up_proj", "fc1"), ("down_proj", "fc2"), ("ffn_sub_norm", "ffn_layernorm"))


class ColumnParallelProjection:
    """The Hugging Face integration's adapter (``_projections.PROJECTIONS``) of a
    ``ColumnParallelLinear``: its call and group call are ``column_parallel_group``'s, with the
    norm arguments ``nargs`` (ln_weight, ln_bias, eps, norm) of the outer norm."""

    @staticmethod
    def accepts(linear: nn.Module, x, options) -> bool:
        return not has_hooks(linear) and linear.weight.dtype == x.dtype

    @staticmethod
    def call(x, nargs, linear: nn.Module, options, **kwargs):
        if kwargs:  # an output projection is row-parallel (``parallel_project``)
            raise ValueError(f"a column-parallel projection takes no {sorted(kwargs)}")
        return column_parallel_group(x, *nargs, [linear], options.backend)[0]

    @staticmethod
    def group(x, nargs, linears, options):
        return column_parallel_group(x, *nargs, linears, options.backend)


def _present(module: nn.Module, names) -> list[str]:
    return [n for n in names if isinstance(getattr(module, n, None), nn.Module)]


def _shard_block(module, columns: dict, row: str, norm: list, out_index, rank, world, group):
    for name in (*columns, row):
        if type(getattr(module, name)) is not nn.Linear:
            kind = type(getattr(module, name)).__name__
            raise ValueError(
                f"tensor parallelism shards nn.Linear projections; {name} is a {kind} (BitNet's "
                "quantised projections are not supported yet: docs/design.md, Tensor "
                "parallelism)"
            )
    for name, index in columns.items():
        linear = getattr(module, name)
        view = (linear.out_features, linear.in_features)
        setattr(module, name, ColumnParallelLinear(linear, index, view, group))
    linear = getattr(module, row)
    view = (linear.out_features, linear.in_features)
    setattr(module, row, RowParallelLinear(linear, out_index, view, group))
    for name in norm:
        setattr(module, name, ShardedNorm.of(getattr(module, name), out_index, group))


def _attention(module: nn.Module, rank: int, world: int, group) -> None:
    head_dim = module.head_dim
    columns = {}
    for name in _ATTENTION[0]:
        heads = getattr(module, name).out_features // head_dim
        if heads % world:
            raise ValueError(f"{name}: {heads} heads do not divide by {world} ranks")
        columns[name] = head_rows(heads, head_dim, 1, rank, world)
    (row,) = _present(module, _ATTENTION[1])
    norm = _present(module, _ATTENTION[2])
    _shard_block(module, columns, row, norm, columns["q_proj"], rank, world, group)


def _mlp(module: nn.Module, rank: int, world: int, group) -> None:
    ups = _present(module, _MLP[0])
    width = getattr(module, ups[0]).out_features
    if width % world:
        raise ValueError(f"{ups[0]}: {width} features do not divide by {world} ranks")
    local = width // world
    index = torch.arange(rank * local, (rank + 1) * local)
    (row,) = _present(module, _MLP[1])
    norm = _present(module, _MLP[2])
    _shard_block(module, dict.fromkeys(ups, index), row, norm, index, rank, world, group)


def tensor_parallelize_transformers(model: nn.Module, mesh, tp_dim=None) -> nn.Module:
    """Shard a Llama, BitNet (dense) or Kosmos-2 text model in place over ``mesh`` (as
    ``tensor_parallelize``) and return it. Every rank must hold the same parameters before."""
    group = _group(mesh, tp_dim)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    blocks = list(model.modules())
    with torch.no_grad():
        for module in blocks:
            if len(_present(module, _ATTENTION[0])) == 3 and _present(module, _ATTENTION[1]):
                _attention(module, rank, world, group)
            elif _present(module, _MLP[0]) and _present(module, _MLP[1]):
                _mlp(module, rank, world, group)
    return model
