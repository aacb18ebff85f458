"""Distributed checkpoints of a tensor-parallel model that load at another tensor-parallel degree.

``sharded_state_dict`` gives the model's state as DTensors over the tensor-parallel mesh: a
shard's parameter as its block of the whole parameter (viewed as ``shard_view``, so that the
packed q/k/v weight's heads of one rank are one block: (3, d, d) sliced on dimension 1), a
replicated one as itself. ``torch.distributed.checkpoint`` saves each block once and loads it
into whatever blocks the loading model's ranks hold, so a checkpoint written by 2 ranks loads on
4 (or on 1: ``mesh`` of one rank, the shard then the whole parameter).

FSDP2 on top (a 2-D mesh, ``fully_shard`` over its data-parallel dimension): a parameter is then
a DTensor of its tensor-parallel shard split again over the data-parallel ranks, in blocks of
rows of that shard, which are no block of the whole parameter's view (the packed q/k/v rows of
one rank's heads are). The state gathers it over the data-parallel ranks first (its
tensor-parallel shard whole on each of them, the same blocks as without FSDP2; the checkpoint
writes each once) and loading puts each rank's rows back: a checkpoint of an FSDP2 × TP model
loads at another tensor-parallel degree, with or without FSDP2, and the other way round. The
cost: the state holds every parameter's tensor-parallel shard unsplit (what FSDP2 holds of one
layer while it runs it, for the whole model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from magneto.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedNorm,
    VocabParallelEmbedding,
)


def _placement(module: nn.Module, name: str) -> tuple[tuple[int, ...], int] | None:
    """(view of the whole parameter, its sharded dimension) for ``module.name``; None when the
    parameter is replicated."""
    view = module.shard_view
    if isinstance(module, ColumnParallelLinear):
        return (view, len(view) - 2) if name == "weight" else (view[:-1], len(view) - 2)
    if isinstance(module, RowParallelLinear):
        return (view, 1) if name == "weight" else None
    if isinstance(module, (ShardedNorm, VocabParallelEmbedding)):
        return view, 0
    return None


def _local_view(local: Tensor, view: tuple[int, ...], dim: int, world: int) -> Tensor:
    shape = list(view)
    shape[dim] //= world
    return local.view(shape)


def sharded_state_dict(model: nn.Module, mesh) -> dict[str, Tensor]:
    """The model's parameters and buffers, sharded ones as DTensors over the 1-D ``mesh`` that
    ``tensor_parallelize`` used (``mesh["tp"]`` of a 2-D one; views of the model's own tensors
    without FSDP2: loading into it in place loads the model)."""
    world = mesh.size()
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        prefix, _, name = key.rpartition(".")
        module = model.get_submodule(prefix)
        placement = _placement(module, name) if hasattr(module, "shard_view") else None
        local = tensor.detach()
        if isinstance(local, DTensor):  # FSDP2's: gathered over the data-parallel ranks
            local = local.full_tensor()
        if placement is None:
            out[key] = DTensor.from_local(local, mesh, [Replicate()], run_check=False)
            continue
        view, dim = placement
        out[key] = DTensor.from_local(
            _local_view(local, view, dim, world),
            mesh,
            [Shard(dim)],
            run_check=False,
            shape=torch.Size(view),
            stride=torch.empty(view, device="meta").stride(),
        )
    return out


def load_sharded_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a state of ``sharded_state_dict(model, mesh)`` filled by
    ``torch.distributed.checkpoint.load`` into the model (a no-op where it loaded in place)."""
    tensors = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in state.items():
            target = tensors[key]
            value = value.to_local().view(target.shape)
            if isinstance(target, DTensor):  # FSDP2's: this data-parallel rank's rows of it
                mesh, placements = target.device_mesh, target.placements
                value = distribute_tensor(value, mesh, placements, src_data_rank=None)
                target, value = target.to_local(), value.to_local()
            target.copy_(value)
