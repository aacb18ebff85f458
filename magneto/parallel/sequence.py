"""Sequence parallelism (Megatron's, on top of tensor parallelism): between the blocks of an
``Encoder`` or ``Decoder`` the residual stream is split on the sequence over the tensor-parallel
ranks, so that each holds (batch, length/world, d) of it (docs/design.md, Tensor parallelism).

- a block's entry all-gathers its input on the sequence before the column-parallel projections
  (q/k/v, fc1), whose fused input norm (the outer norm, in the same ``ln_linear`` as today) then
  reads the whole sequence; the backward of that gather is a reduce-scatter, which replaces the
  all-reduce of the input gradient;
- the row-parallel projections (out_proj, fc2) reduce-scatter their partial outputs on the
  sequence instead of all-reducing them; bias, dropout and the scaled residual add run on this
  rank's rows; their backward all-gathers the gradient;
- the parameters used on this rank's rows only (the row-parallel biases; the outer norms' weight
  and bias, as under tensor parallelism alone) get their gradients all-reduced.

The first layer's input is split (the embeddings stay replicated), the last layer's output
all-gathered (the final norm and the output projection stay as they are). A call with an
``incremental_state`` (decoding with the key/value cache) runs as plain tensor parallelism.
``tensor_parallelize(..., sequence_parallel=True)`` installs it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import magneto_kernels
from magneto.attention import MultiheadAttention
from magneto.feedforward import FeedForward
from magneto.fusion import has_hooks
from magneto.layers import DecoderLayer, EncoderLayer
from magneto.parallel.functional import _LOGS, copy_to_parallel

_ACTIVE: list = []
"""One entry per layer call in progress: its tensor-parallel group while the layer runs
sequence-parallel, else None (``active``)."""


def active():
    """The group of the sequence-parallel layer now running, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def _log(name: str, x: Tensor) -> None:
    for log in _LOGS:
        log.append((name, x.numel() * x.element_size()))


def _gather(x: Tensor, group) -> Tensor:
    """Every rank's x concatenated on dimension 1 (the sequence), in rank order."""
    _log("all_gather", x)
    world = dist.get_world_size(group)
    local = x.movedim(1, 0).contiguous()
    out = local.new_empty((world * local.shape[0], *local.shape[1:]))
    dist.all_gather_single(out, local, group=group)
    return out.movedim(0, 1)


def _reduce_scatter(x: Tensor, group) -> Tensor:
    """This rank's block of dimension 1 of the sum of every rank's x."""
    world = dist.get_world_size(group)
    whole = x.movedim(1, 0).contiguous()
    out = whole.new_empty((whole.shape[0] // world, *whole.shape[1:]))
    _log("reduce_scatter", out)
    dist.reduce_scatter_single(out, whole, group=group)
    return out.movedim(0, 1)


def _local(x: Tensor, group) -> Tensor:
    """This rank's block of dimension 1 of x."""
    length = x.shape[1] // dist.get_world_size(group)
    return x.narrow(1, dist.get_rank(group) * length, length)


def _split(x: Tensor, group) -> Tensor:
    return _local(x, group).contiguous()


class _Collective(torch.autograd.Function):
    """``forward(x, group)``, its gradient ``backward(dy, group)``: each pair below is a
    collective and its conjugate."""

    @staticmethod
    def forward(ctx, x, group, forward, backward):
        ctx.group, ctx.conjugate = group, backward
        return forward(x, group)

    @staticmethod
    def backward(ctx, dy):
        return ctx.conjugate(dy, ctx.group), None, None, None


def gather_sequence(x: Tensor, group) -> Tensor:
    """The whole sequence of a split x, into a column-parallel projection: backward
    reduce-scatters (each rank holds a partial gradient of the whole sequence)."""
    return _Collective.apply(x, group, _gather, _reduce_scatter)


def reduce_scatter_sequence(x: Tensor, group) -> Tensor:
    """This rank's rows of the sum of a row-parallel projection's partial outputs: backward
    all-gathers."""
    return _Collective.apply(x, group, _reduce_scatter, _gather)


def split_sequence(x: Tensor, group) -> Tensor:
    """Replicated -> split (the first layer's input): this rank's rows; backward all-gathers
    (the embeddings before it want the whole gradient on every rank)."""
    return _Collective.apply(x, group, _split, _gather)


def join_sequence(x: Tensor, group) -> Tensor:
    """Split -> replicated (the last layer's output): all-gather; backward keeps this rank's
    rows (the gradient after it is the same on every rank)."""
    return _Collective.apply(x, group, _gather, _split)


def sequence_dropout(y: Tensor, p: float, group) -> Tensor:
    """Dropout of this rank's rows with the mask a one-process run draws for the whole sequence
    (torch's generator is in the same state on every rank): drawn whole, this rank's rows kept."""
    shape = list(y.shape)
    shape[1] *= dist.get_world_size(group)
    mask = magneto_kernels.dropout(y.new_ones(shape), p)
    return y * _local(mask, group)


class SequenceParallelAttention(MultiheadAttention):
    """Self-attention over the whole sequence from this rank's rows: the query gathered, the
    output (reduce-scattered by ``out_proj``) added to this rank's rows of the residual."""

    def forward(self, query, key=None, value=None, *args, residual=None, alpha=1.0, **kwargs):
        group = active()
        if group is None:
            kwargs.update(residual=residual, alpha=alpha)
            return super().forward(query, key, value, *args, **kwargs)
        if key is not None or value is not None:
            raise ValueError("sequence parallelism runs self-attention only")
        y, weights = super().forward(gather_sequence(query, group), *args, **kwargs)
        return (y if residual is None else alpha * residual + y), weights


class SequenceParallelFeedForward(FeedForward):
    """The feed-forward block on the gathered sequence; fc2 reduce-scatters to this rank's rows,
    where its residual is."""

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        group = active()
        return super().forward(x if group is None else gather_sequence(x, group), **kwargs)


class _SequenceParallelLayer:
    """Mixed into a layer's class: its call runs sequence-parallel (the first layer splits its
    input, the last gathers its output) unless it decodes with an ``incremental_state``."""

    def forward(self, x: Tensor, *args, **kwargs):
        group = self.sequence_group if kwargs.get("incremental_state") is None else None
        if group is not None and self.sequence_split:
            world = dist.get_world_size(group)
            if x.shape[1] % world:
                raise ValueError(
                    f"sequence parallelism: the length {x.shape[1]} is not divisible by the "
                    f"{world} tensor-parallel ranks"
                )
            x = split_sequence(x, group)
        if group is not None and (has_hooks(self.self_attn) or has_hooks(self.ffn)):
            raise ValueError(
                "sequence parallelism: a sublayer with hooks is called on its norm's output, "
                "which would run on this rank's rows unfused, its gradient not all-reduced"
            )
        _ACTIVE.append(group)
        try:
            out = super().forward(x, *args, **kwargs)
        finally:
            _ACTIVE.pop()
        if group is None or not self.sequence_join:
            return out
        return (join_sequence(out[0], group), *out[1:])


class SequenceParallelEncoderLayer(_SequenceParallelLayer, EncoderLayer):
    pass


class SequenceParallelDecoderLayer(_SequenceParallelLayer, DecoderLayer):
    pass


_LAYER_CLASSES = {
    EncoderLayer: SequenceParallelEncoderLayer,
    DecoderLayer: SequenceParallelDecoderLayer,
}


def check_sequence_parallel(model: nn.Module) -> None:
    """ValueError unless ``model`` is a stack sequence parallelism supports."""
    from magneto.stack import Stack

    config = getattr(model, "config", None)
    if not isinstance(model, Stack) or model.is_encoder_decoder:
        raise ValueError(
            "sequence parallelism: an Encoder or a Decoder (not an EncoderDecoder, whose "
            f"cross-attention reads the encoder's whole output), got {type(model).__name__}"
        )
    if config.multiway:
        raise ValueError("sequence parallelism: multiway models (BEiT3) are not supported yet")
    if any(type(layer) not in _LAYER_CLASSES for layer in model.layers):
        raise ValueError("sequence parallelism: layers other than magneto's are not supported")
    if not config.normalize_before:
        raise ValueError(
            f"sequence parallelism: norm_scheme={config.norm_scheme!r} adds and normalises on "
            "this rank's rows (add_layer_norm), whose weights' gradients are not all-reduced "
            "yet: use 'subln' or 'pre'"
        )


def install(model: nn.Module, group) -> None:
    """Make a tensor-parallel ``Encoder`` or ``Decoder`` sequence-parallel (module docstring)."""
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        layer.self_attn.__class__ = SequenceParallelAttention
        layer.ffn.__class__ = SequenceParallelFeedForward
        layer.__class__ = _LAYER_CLASSES[type(layer)]
        layer.sequence_group = group
        layer.sequence_split, layer.sequence_join = i == 0, i == len(layers) - 1


def row_output(y: Tensor, bias: Optional[Tensor], dropout_p: float, group) -> Tensor:
    """A row-parallel projection's output on this rank's rows: the partial products
    reduce-scattered, the bias (its gradient all-reduced: each rank adds it to its own rows)
    added, dropout."""
    y = reduce_scatter_sequence(y, group)
    if bias is not None:
        y = y + copy_to_parallel(bias, group)
    return y if dropout_p == 0.0 else sequence_dropout(y, dropout_p, group)
