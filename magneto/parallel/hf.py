"""The tensor-parallel plan of Hugging Face's Sub-LN families and Llama: BitNet (dense
projections or transformers' quantised ones), Kosmos-2's text model, Llama; patched by
``apply_magneto`` or not.

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
residual add). BitNet's quantised projections shard as ``ColumnParallelBitLinear`` /
``RowParallelBitLinear`` (docs/design.md, Tensor parallelism: the whole weight's scale and the
row-parallel activation scale, each one more all-reduce). transformers' own ``tp_plan`` (DTensor
parameters behind hooks) composes with ``apply_magneto`` the other way: its projections run as
its modules.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import magneto_kernels
from magneto.fusion import has_hooks
from magneto.parallel.functional import (
    _all_reduce,
    reduce_from_parallel,
    row_parallel_norm_linear,
    whole_weight_scale,
)
from magneto.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedNorm,
    _shard,
    column_parallel_group,
    head_rows,
)
from magneto.parallel.plan import _group
from magneto_kernels import quant
from magneto_kernels.codes import QUANT_PACK_UNIT

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
    def group(x, nargs, linears, options, concat=False):
        # concat: the shards' outputs concatenated after the call (column_parallel_group
        # returns one tensor per projection)
        outs = column_parallel_group(x, *nargs, linears, options.backend)
        return torch.cat(outs, dim=-1) if concat else outs


def _bitnet_mode(linear: nn.Module) -> Optional[str]:
    """ln_linear's quantised mode of one of transformers' BitNet classes (packed by
    ``apply_magneto`` or not), None for another class."""
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear

    if isinstance(linear, BitLinear):
        return "bitlinear"
    if isinstance(linear, AutoBitLinear):
        return "bitnet_online" if linear.online_quant else "bitnet_offline"
    return None


def _ternary(linear: nn.Module, mode: str) -> Tensor:
    """The whole ternary weight (float32) of an offline BitNet projection: its module's weight,
    or the packed one where ``apply_magneto`` dropped it."""
    if linear.weight.is_meta:
        return quant.unpack(linear._magneto_packed)
    if mode == "bitlinear":
        return quant.unpack_hf(linear.weight.detach(), linear.out_features).float()
    return linear.weight.detach().float()


class _QuantShard:
    """What the shards of BitNet's quantised projections share: online, the master weight's
    slice (a parameter; its scale the whole weight's mean|W|, one all-reduce of Σ|W| per call);
    offline, the ternary weight's slice packed (``quant.pack``) and the stored ``weight_scale``
    (per tensor: the same on every rank)."""

    def _keep_quantised(self, linear: nn.Module, mode: str, dim: int, index: Tensor) -> None:
        if getattr(linear, "rms_norm", None) is not None or linear.bias is not None:
            raise ValueError(
                "tensor parallelism shards BitNet projections without their own norm or bias"
            )
        self.quant, self.numel, self.bias = mode, linear.weight.numel(), None
        if mode == "bitnet_online":
            self.weight = _shard(linear.weight, dim, index)
            self.weight_scale = None
            return
        ternary = _ternary(linear, mode).index_select(dim, index.to(linear.weight_scale.device))
        if ternary.shape[1] % QUANT_PACK_UNIT:
            raise ValueError(
                f"a shard's in_features ({ternary.shape[1]}) must be a multiple of "
                f"{QUANT_PACK_UNIT} to pack (fewer ranks)"
            )
        self.register_buffer("packed", quant.pack(ternary), persistent=False)
        self.register_buffer("weight_scale", linear.weight_scale.detach().clone())

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype if self.quant == "bitnet_online" else self.weight_scale.dtype

    def _operands(self, dtype: Optional[torch.dtype] = None):
        """(weight, weight_scale): the master weight and the whole weight's scale (online), the
        packed weight (unpacked into ``dtype`` when given: the modules' formula) and the stored
        scale (offline)."""
        if self.quant == "bitnet_online":
            return self.weight, whole_weight_scale(self.weight, self.numel, self.group)
        packed = self.packed if dtype is None else quant.unpack(self.packed, dtype)
        return packed, self.weight_scale


class ColumnParallelBitLinear(_QuantShard, ColumnParallelLinear):
    """This rank's output rows of a BitNet quantised projection; the input is replicated, and the
    activation quantisation (per row) is local."""

    def __init__(self, linear, index: Tensor, view: tuple[int, ...], group, mode: str):
        nn.Module.__init__(self)
        self._keep_quantised(linear, mode, 0, index)
        self.in_features, self.out_features = linear.in_features, index.numel()
        self._keep(0, index, view, group)

    def forward(self, x: Tensor) -> Tensor:
        weight, scale = self._operands(x.dtype)
        return quant.ln_linear_bitnet(
            self._input(x), None, weight, quant=self.quant, weight_scale=scale
        )

    def parallel_project(
        self, x, norm, *, input_activation, residual, alpha, dropout_p, rows, backend
    ) -> Tensor:
        raise ValueError("a quantised column-parallel shard is called through apply_magneto")

    def call(self, x: Tensor, nargs, backend) -> Tensor:
        """The fused ``ln_linear`` of this shard with its input norm ``nargs`` (ln_weight,
        ln_bias, eps, norm)."""
        ln_weight, ln_bias, eps, norm = nargs
        weight, scale = self._operands()
        return magneto_kernels.ln_linear(
            self._input(x), weight=weight, quant=self.quant, weight_scale=scale, backend=backend,
            **self._norm(ln_weight, ln_bias, eps=eps, norm=norm),
        )  # fmt: skip


class RowParallelBitLinear(_QuantShard, RowParallelLinear):
    """This rank's input columns of a BitNet quantised projection (o_proj, down_proj): the
    per-row activation scale is a max over every rank's features, one all-reduce (MAX)."""

    def __init__(self, linear, index: Tensor, view: tuple[int, ...], group, mode: str):
        nn.Module.__init__(self)
        self._keep_quantised(linear, mode, 1, index)
        self.in_features, self.out_features = index.numel(), linear.out_features
        self._keep(1, index, view, group)

    def forward(self, h: Tensor) -> Tensor:
        amax = h.detach().float().abs().amax(-1).contiguous()
        _all_reduce(amax, self.group, dist.ReduceOp.MAX)
        weight, scale = self._operands(h.dtype)
        partial = quant.ln_linear_bitnet(
            h, None, weight, quant=self.quant, weight_scale=scale, row_amax=amax
        )
        return reduce_from_parallel(partial, self.group)

    def parallel_project(
        self, x, norm, *, input_activation, residual, alpha, dropout_p, rows, backend
    ) -> Tensor:
        """``alpha·residual + dropout(sum over ranks(Q(W_r, N(in_act(x_r)))))``: the sharded
        sub-norm, the row amax and the quantised projection through the op families'
        entry points (``row_parallel_norm_linear``)."""
        if rows is not None or not isinstance(norm, ShardedNorm):
            raise ValueError("a quantised row-parallel shard takes its sharded sub-norm")
        partial = row_parallel_norm_linear(
            x, norm.weight, norm.bias, self.packed if self.quant != "bitnet_online" else
            self.weight, norm.eps, norm.norm, input_activation, self.group, backend,
            quant=self.quant, weight_scale=self.weight_scale, numel=self.numel,
        )  # fmt: skip
        y = self._output(partial, dropout_p)
        return y if residual is None else alpha * residual + y


class ColumnParallelBitProjection:
    """The Hugging Face integration's adapter (``_projections.PROJECTIONS``) of a
    ``ColumnParallelBitLinear``: one quantised ``ln_linear`` per shard (as one process runs
    BitNet's q/k/v and gate/up), on the backends with the quantised modes (``quant.BACKENDS``:
    each takes their tensor-parallel arguments); on another a shard runs its module's forward
    (transformers' formula on the shards, with the same collectives)."""

    @staticmethod
    def accepts(linear: nn.Module, x, options) -> bool:
        backend = magneto_kernels.resolve_backend(options.backend, x)
        return (
            not has_hooks(linear) and linear.compute_dtype == x.dtype and backend in quant.BACKENDS
        )

    @staticmethod
    def call(x, nargs, linear: nn.Module, options, **kwargs):
        if kwargs:  # an output projection is row-parallel (``parallel_project``)
            raise ValueError(f"a column-parallel projection takes no {sorted(kwargs)}")
        return linear.call(x, nargs, options.backend)

    @staticmethod
    def group(x, nargs, linears, options, concat=False):
        outs = tuple(linear.call(x, nargs, options.backend) for linear in linears)
        return torch.cat(outs, dim=-1) if concat else outs


def _present(module: nn.Module, names) -> list[str]:
    return [n for n in names if isinstance(getattr(module, n, None), nn.Module)]


def _shard_block(module, columns: dict, row: str, norm: list, out_index, rank, world, group):
    modes = {}
    for name in (*columns, row):
        linear = getattr(module, name)
        modes[name] = _bitnet_mode(linear)
        if type(linear) is not nn.Linear and modes[name] is None:
            raise ValueError(
                f"tensor parallelism shards nn.Linear projections and BitNet's quantised ones;"
                f" {name} is a {type(linear).__name__}"
            )
    for name, index in columns.items():
        linear = getattr(module, name)
        view = (linear.out_features, linear.in_features)
        if modes[name] is None:
            setattr(module, name, ColumnParallelLinear(linear, index, view, group))
        else:
            setattr(module, name, ColumnParallelBitLinear(linear, index, view, group, modes[name]))
    linear = getattr(module, row)
    view = (linear.out_features, linear.in_features)
    if modes[row] is None:
        setattr(module, row, RowParallelLinear(linear, out_index, view, group))
    else:
        setattr(module, row, RowParallelBitLinear(linear, out_index, view, group, modes[row]))
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
    """Shard a Llama, BitNet (dense or quantised) or Kosmos-2 text model in place over ``mesh`` (as
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
