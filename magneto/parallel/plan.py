"""``tensor_parallelize``: shard a Magneto model's attention and feed-forward blocks over the
ranks of a device mesh (Megatron's plan, docs/design.md, Tensor parallelism).

Per block, with world ranks and this rank r:

- attention: ``in_proj`` column-parallel by heads (rank r keeps heads r·h/world … of q, of k and
  of v, so its q/k/v stay one packed GEMM); the core runs on the rank's heads alone;
  ``inner_attn_ln`` sharded with the features it normalises; ``out_proj`` row-parallel (one
  all-reduce of its output). A decoder's cross-attention the same, without the inner norm.
- feed-forward: ``fc1`` column-parallel, ``ffn_layernorm`` sharded, ``fc2`` row-parallel.
- everything else (embeddings, outer norms, the output projection) stays replicated; the
  gradients reaching it are whole on every rank, so the ranks stay in step.

With ``sequence_parallel`` the residual stream between the blocks is split on the sequence
as well (``magneto.parallel.sequence``).

The outer norm before q/k/v and fc1 stays fused into the column-parallel GEMM; the inner Sub-LN
norms are computed over the shards (``magneto.parallel.functional.sharded_norm``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from magneto.attention import MultiheadAttention
from magneto.feedforward import FeedForward
from magneto.multiway import Multiway
from magneto.parallel import sequence
from magneto.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedNorm,
    VocabParallelEmbedding,
    head_rows,
)


def _group(mesh, tp_dim):
    if isinstance(mesh, dist.ProcessGroup):
        return mesh
    if mesh.ndim == 1:
        return mesh.get_group()
    if tp_dim is None:
        raise ValueError("tp_dim: a mesh of several dimensions needs the tensor-parallel one named")
    return mesh.get_group(tp_dim)


def _copies(module: nn.Module, name: str):
    """(owner, attribute) of ``module.name``, or of both copies of a ``Multiway`` pair."""
    child = getattr(module, name)
    if child is None:
        return []
    if isinstance(child, Multiway):
        return [(child, "A"), (child, "B")]
    return [(module, name)]


def _check_linear(module: nn.Module, where: str) -> None:
    if type(module) is not nn.Linear:
        raise ValueError(f"tensor parallelism shards nn.Linear; {where} is a {type(module)}")


def _attention(attn: MultiheadAttention, rank: int, world: int, group) -> None:
    heads, head_dim = attn.num_heads, attn.head_dim
    if heads % world:
        raise ValueError(f"num_heads={heads} is not divisible by the {world} tensor-parallel ranks")
    rows = head_rows(heads, head_dim, 3, rank, world)
    cols = head_rows(heads, head_dim, 1, rank, world)
    width = heads * head_dim
    for owner, name in _copies(attn, "in_proj"):
        linear = getattr(owner, name)
        _check_linear(linear, "in_proj")
        view = (3, width, linear.in_features)
        setattr(owner, name, ColumnParallelLinear(linear, rows, view, group))
    for owner, name in _copies(attn, "out_proj"):
        linear = getattr(owner, name)
        _check_linear(linear, "out_proj")
        view = (linear.out_features, width)
        setattr(owner, name, RowParallelLinear(linear, cols, view, group))
    for owner, name in _copies(attn, "inner_attn_ln"):
        setattr(owner, name, ShardedNorm.of(getattr(owner, name), cols, group))
    attn.num_heads = heads // world
    attn.inner_dim = attn.num_heads * head_dim


def _feed_forward(ffn: FeedForward, rank: int, world: int, group) -> None:
    ffn_dim = ffn.ffn_dim
    if ffn_dim % world:
        raise ValueError(f"ffn_dim={ffn_dim} is not divisible by the {world} tensor-parallel ranks")
    local = ffn_dim // world
    index = torch.arange(rank * local, (rank + 1) * local)
    ffn.fc1 = ColumnParallelLinear(ffn.fc1, index, (ffn_dim, ffn.embed_dim), group)
    ffn.fc2 = RowParallelLinear(ffn.fc2, index, (ffn.embed_dim, ffn_dim), group)
    if ffn.ffn_layernorm is not None:
        ffn.ffn_layernorm = ShardedNorm.of(ffn.ffn_layernorm, index, group)


def _vocabulary(model: nn.Module, rank: int, world: int, group) -> None:
    """Token embeddings and output projections split by vocabulary blocks; a weight shared by
    several (tied embeddings) stays one parameter."""
    shards = {}  # id of a whole weight -> its shard, for tied weights
    for module in list(model.modules()):
        for name in ("embed_tokens", "output_projection"):
            child = getattr(module, name, None)
            if child is None or isinstance(child, (VocabParallelEmbedding, ColumnParallelLinear)):
                continue
            vocab = child.weight.shape[0]
            if vocab % world:
                raise ValueError(f"vocab_size={vocab} is not divisible by {world} ranks")
            index = torch.arange(rank * vocab // world, (rank + 1) * vocab // world)
            if name == "embed_tokens":
                shard = VocabParallelEmbedding(child, index, group)
            else:
                _check_linear(child, name)
                shard = ColumnParallelLinear(child, index, tuple(child.weight.shape), group)
            whole = id(child.weight)
            if whole in shards:
                shard.weight = shards[whole]
            shards[whole] = shard.weight
            setattr(module, name, shard)


def tensor_parallelize(
    model: nn.Module,
    mesh,
    tp_dim=None,
    *,
    vocab_parallel: bool = False,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Shard ``model`` (an ``Encoder``, ``Decoder``, ``EncoderDecoder``, ``BEiT3`` or anything
    made of magneto's ``MultiheadAttention`` and ``FeedForward``) in place over ``mesh`` (a 1-D
    ``DeviceMesh``, a named dimension ``tp_dim`` of a larger one, or a process group) and return
    it. Every rank must hold the same parameters before (built from the same seed, or loaded):
    each keeps its slice of them. Not supported yet (ValueError): mixture-of-experts layers and
    relative position buckets (a bias of every head, which would need slicing by rank).

    ``vocab_parallel``: token embeddings and output projections split by vocabulary blocks too;
    the model then returns this rank's block of the logits, for
    ``vocab_parallel_cross_entropy`` (the whole logits are never gathered).

    ``sequence_parallel``: between the blocks the residual stream is split on the sequence
    too (``magneto.parallel.sequence``; the length must divide by the ranks): an ``Encoder``,
    a ``Decoder``, an ``EncoderDecoder`` or a ``BEiT3``, every norm scheme (ValueError
    otherwise)."""
    group = _group(mesh, tp_dim)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config = getattr(model, "config", None)
    if config is not None and (config.moe_freq or config.rel_pos_buckets):
        raise ValueError("tensor parallelism: MoE layers and rel_pos_buckets are not supported yet")
    if sequence_parallel:
        sequence.check_sequence_parallel(model)
    blocks = list(model.modules())
    with torch.no_grad():
        for module in blocks:
            if isinstance(module, MultiheadAttention):
                _attention(module, rank, world, group)
            elif isinstance(module, FeedForward):
                _feed_forward(module, rank, world, group)
        if vocab_parallel:
            _vocabulary(model, rank, world, group)
    if sequence_parallel:
        sequence.install(model, group)
    return model
