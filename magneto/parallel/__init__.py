"""Tensor parallelism for Magneto models on torch.distributed (docs/design.md, Tensor
parallelism): ``tensor_parallelize`` shards a model's blocks over a mesh, ``sharded_norm`` is
the Sub-LN norm over features split across ranks, ``sharded_state_dict`` the distributed
checkpoint that loads at another tensor-parallel degree."""

from magneto.parallel.checkpoint import load_sharded_state_dict, sharded_state_dict
from magneto.parallel.functional import (
    chan_combine,
    communication_log,
    copy_to_parallel,
    reduce_from_parallel,
    sharded_norm,
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)
from magneto.parallel.hf import tensor_parallelize_transformers
from magneto.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedNorm,
    VocabParallelEmbedding,
    shard_of,
)
from magneto.parallel.plan import tensor_parallelize

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ShardedNorm",
    "VocabParallelEmbedding",
    "chan_combine",
    "communication_log",
    "copy_to_parallel",
    "load_sharded_state_dict",
    "reduce_from_parallel",
    "shard_of",
    "sharded_norm",
    "sharded_state_dict",
    "tensor_parallelize",
    "tensor_parallelize_transformers",
    "vocab_parallel_argmax",
    "vocab_parallel_cross_entropy",
]
