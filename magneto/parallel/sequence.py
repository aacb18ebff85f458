"""Sequence parallelism (Megatron's, on top of tensor parallelism): between the blocks of an
``Encoder``, a ``Decoder`` or both stacks of an ``EncoderDecoder`` the residual stream is split
on the sequence over the tensor-parallel ranks, so that each holds (batch, length/world, d) of
it (docs/design.md, Tensor parallelism).

- a block's entry all-gathers its input on the sequence before the column-parallel projections
  (q/k/v, fc1), whose fused input norm (Pre-LN, Sub-LN: the outer norm, in the same
  ``ln_linear`` as today) then reads the whole sequence; the backward of that gather is a
  reduce-scatter, which replaces the all-reduce of the input gradient;
- the row-parallel projections (out_proj, fc2) reduce-scatter their partial outputs on the
  sequence instead of all-reducing them; bias, dropout and the scaled residual add run on this
  rank's rows, and so does a norm after the add (Post-LN, DeepNorm: ``add_layer_norm``); their
  backward all-gathers the gradient;
- the parameters used on this rank's rows only (the row-parallel biases, the norms after the
  add) and the outer norms before the column-parallel projections (each rank's columns give a
  partial gradient, as under tensor parallelism alone) get their gradients all-reduced;
- a decoder's cross-attention gathers its query; its keys and values are projected from the
  whole encoder output (the encoder's last layer gathered it), whose gradient is all-reduced
  as under tensor parallelism alone.

Each stack splits its first layer's input (the embeddings and ``layernorm_embedding`` run on
the whole sequence, replicated) and gathers its last layer's output (the final norm and the
output projection run on the whole sequence, replicated: their gradients are whole on every
rank). A call with an ``incremental_state`` (decoding with the key/value cache) runs as plain
tensor parallelism.

A multiway encoder (BEiT3) whose split falls inside the sequence holds this rank's rows as the
two parts, one of them empty on the ranks whose rows are all of one modality
(``forward_parts``). A block gathers the rows into the whole sequence's two parts, runs each
part's projections with that part's copy, and reduce-scatters the two parts' partial outputs as
one sequence (a part's length need not divide by the ranks); each part's bias, dropout and
residual add then run on this rank's rows of it (``_residual_parts``). A single-modality call
runs as any other stack.

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
from magneto.fusion import add_norm, has_hooks
from magneto.layers import DecoderLayer, EncoderLayer
from magneto.multiway import Multiway
from magneto.norm import NormLayer
from magneto.parallel.functional import _LOGS, copy_to_parallel

_ACTIVE: list = []
"""One entry per layer call in progress: its tensor-parallel group while the layer runs
sequence-parallel, else None (``active``)."""


def active():
    """The group of the sequence-parallel layer now running, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


_PARTS: list = []
"""Non-empty while a multiway layer's sublayer runs on the whole sequence's two parts
(``_SequenceParallelLayer._residual_parts``)."""


def deferred() -> bool:
    """Whether the sublayer now running takes its input gathered already and leaves its
    row-parallel outputs partial (no bias): its multiway layer reduce-scatters both parts at
    once, for a part's length need not divide by the ranks."""
    return bool(_PARTS)


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
    """Attention over the whole sequence from this rank's rows: the query gathered, the output
    (reduce-scattered by ``out_proj``) added to this rank's rows of the residual. Cross-attention
    reads the encoder output whole (the encoder's last layer gathered it): its keys and values
    are projected from it as under tensor parallelism alone, its gradient all-reduced."""

    def forward(self, query, key=None, value=None, *args, residual=None, alpha=1.0, **kwargs):
        group = active()
        if group is None or deferred():
            kwargs.update(residual=residual, alpha=alpha)
            return super().forward(query, key, value, *args, **kwargs)
        if key is not None:  # replicated, unlike the gathered query: its gradient summed here
            kv = copy_to_parallel(key, group)
            key, value = kv, kv if value is None or value is key else copy_to_parallel(value, group)
        query = gather_sequence(query, group)
        y, weights = super().forward(query, key, value, *args, **kwargs)
        return (y if residual is None else alpha * residual + y), weights


class SequenceParallelFeedForward(FeedForward):
    """The feed-forward block on the gathered sequence; fc2 reduce-scatters to this rank's rows,
    where its residual is."""

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        group = active()
        gathered = group is None or deferred()
        return super().forward(x if gathered else gather_sequence(x, group), **kwargs)


def _split_input(x: Tensor, group) -> Tensor:
    """A stack's first layer's input split (``split_sequence``); ValueError unless the length
    divides by the ranks."""
    world = dist.get_world_size(group)
    if x.shape[1] % world:
        raise ValueError(
            f"sequence parallelism: the length {x.shape[1]} is not divisible by the {world} "
            "tensor-parallel ranks"
        )
    return split_sequence(x, group)


class _SequenceParallelLayer:
    """Mixed into a layer's class: its call runs sequence-parallel (the first layer splits its
    input, the last gathers its output) unless it decodes with an ``incremental_state``."""

    def forward(self, x: Tensor, *args, **kwargs):
        group = self.sequence_group if kwargs.get("incremental_state") is None else None
        if group is not None:
            world = dist.get_world_size(group)
            length = x.shape[1] if self.sequence_split else x.shape[1] * world
            split = kwargs.get("multiway_split_position")
            if split == length:  # copy A for every token, whatever this rank's length
                kwargs["multiway_split_position"] = -1
            elif split not in (None, -1, 0):
                raise ValueError(
                    "sequence parallelism: a multiway split inside the sequence runs through "
                    "forward_parts (as the Encoder calls it)"
                )
            self._check_hooks()
        if group is not None and self.sequence_split:
            x = _split_input(x, group)
        _ACTIVE.append(group)
        try:
            out = super().forward(x, *args, **kwargs)
        finally:
            _ACTIVE.pop()
        if group is None or not self.sequence_join:
            return out
        return (join_sequence(out[0], group), *out[1:])

    def forward_parts(self, parts, *args, **kwargs):
        """``EncoderLayer.forward_parts`` on this rank's rows of the sequence ``cat(parts)``,
        held as its two parts (either may be empty): the first layer splits the whole parts,
        the last gathers them back; ``sequence_parts["split"]`` keeps the whole sequence's
        split position for the layers between."""
        group = self.sequence_group if kwargs.get("incremental_state") is None else None
        if group is None:
            return super().forward_parts(parts, *args, **kwargs)
        if self.sequence_split:
            self.sequence_parts["split"] = parts[0].shape[1]
            x = _split_input(torch.cat(list(parts), dim=1), group)
            parts = self._local_parts(x, group)
        self._check_hooks()
        _ACTIVE.append(group)
        try:
            out = super().forward_parts(parts, *args, **kwargs)
        finally:
            _ACTIVE.pop()
        if not self.sequence_join:
            return out
        whole = join_sequence(torch.cat(out, dim=1), group)
        split = self.sequence_parts["split"]
        return [whole[:, :split].contiguous(), whole[:, split:].contiguous()]

    def _local_parts(self, x: Tensor, group) -> list:
        """This rank's rows x as the two parts: the first ``split − start`` rows (clamped to
        [0, rows]) in part A."""
        start = dist.get_rank(group) * x.shape[1]
        rows = min(max(self.sequence_parts["split"] - start, 0), x.shape[1])
        return [x[:, :rows].contiguous(), x[:, rows:].contiguous()]

    def _check_hooks(self) -> None:
        modules = []
        for m in self._fused_modules():
            modules += [m, m.A, m.B] if isinstance(m, Multiway) else [m]
        if any(has_hooks(m) for m in modules):
            raise ValueError(
                "sequence parallelism: a sublayer or norm with hooks is called as a module, "
                "on this rank's rows, unfused: its parameters' gradients not all-reduced"
            )

    def _fused_modules(self) -> list:
        """The sublayers, and the norms after the residual add (Post-LN, DeepNorm), that must
        run fused (without hooks) for their collectives to run."""
        names = ["self_attn", "encoder_attn", "ffn"]
        if not self.normalize_before:
            names += ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"]
        return [m for m in (getattr(self, n, None) for n in names) if m is not None]

    def residual(self, x, norm, sublayer, aux=False, **kwargs):
        """``ResidualLayer.residual``; in a sequence-parallel call a norm after the residual add
        (Post-LN, DeepNorm: ``add_layer_norm`` on this rank's rows) reads its weight and bias
        through ``copy_to_parallel``, which sums their partial gradients over the ranks; a
        multiway sequence's parts go through ``_residual_parts``."""
        group = active()
        if group is not None and isinstance(x, list):
            return self._residual_parts(x, norm, sublayer, group, **kwargs)
        if group is not None and not self.normalize_before:
            norm = _rows_norm(norm, group)
        return super().residual(x, norm, sublayer, aux, **kwargs)

    def _residual_parts(self, parts: list, norm: Multiway, sublayer, group, **kwargs) -> list:
        """A multiway residual block on this rank's rows held as two parts. The rows are
        gathered into the whole sequence's two parts, the sublayer runs on those (each part's
        column-parallel projections with that part's copy and fused input norm) and leaves its
        row-parallel outputs partial (``deferred``); the two parts' partial outputs, one whole
        sequence, are reduce-scattered at once; then on this rank's rows of each part that
        part's bias (gradient all-reduced), the output dropout (this rank's rows of the mask
        one process draws for the whole part, A's then B's), drop path, and the residual add
        (and a norm after it, Post-LN/DeepNorm)."""
        split = self.sequence_parts["split"]
        whole = gather_sequence(torch.cat(parts, dim=1), group)
        before = self.normalize_before
        _PARTS.append(True)
        try:
            ys = sublayer(
                [whole[:, :split].contiguous(), whole[:, split:].contiguous()],
                input_norm=norm if before else None,
                dropout_p=0.0,
                **kwargs,
            )
        finally:
            _PARTS.pop()
        ys = ys[0] if isinstance(ys, tuple) else ys  # attention: (parts, weights)
        y = reduce_scatter_sequence(torch.cat(ys, dim=1), group)
        ys = y.split([x.shape[1] for x in parts], dim=1)
        p = self.config.dropout if self.training else 0.0
        start = dist.get_rank(group) * y.shape[1]
        ys = list(ys)
        for part, y in enumerate(ys):
            bias = _row_bias(sublayer, part)
            if bias is not None:
                y = y + copy_to_parallel(bias, group)
            if p > 0.0:  # this part's whole mask, its rows from start (A) or start − split (B)
                first = min(start, split) if part == 0 else max(start - split, 0)
                length = split if part == 0 else whole.shape[1] - split
                mask = magneto_kernels.dropout(y.new_ones(y.shape[0], length, y.shape[2]), p)
                y = y * mask.narrow(1, first, y.shape[1])
            ys[part] = y
        if self.drop_path is not None and self.training:  # drawn after the masks, as there
            keep = self.drop_path.sample(parts[0]) / (1.0 - self.drop_path.p)
            ys = [y * keep for y in ys]
        if before:
            return [self.alpha * x + y for x, y in zip(parts, ys)]
        site, c = f"{type(self).__name__}'s norm", self.config
        return [  # an empty part too: every rank runs the same collectives
            add_norm(site, _rows_norm(n, group), y, x, self.alpha, c.backend, c.residual_in_fp32)
            for n, x, y in zip((norm[0], norm[1]), parts, ys)
        ]


def _row_bias(sublayer: nn.Module, part: int) -> Optional[Tensor]:
    """The bias of a multiway sublayer's row-parallel projection for ``part``: attention's
    ``out_proj`` copy, a feed-forward copy's ``fc2``."""
    if isinstance(sublayer, Multiway):
        return sublayer[part].fc2.bias
    return sublayer.out_proj[part].bias


def _rows_norm(norm: NormLayer, group) -> NormLayer:
    """A view of ``norm`` (a ``NormLayer`` of no parameters of its own) whose weight and bias
    are ``norm``'s through ``copy_to_parallel``: what ``add_layer_norm`` reads instead of them
    (``magneto.fusion.norm_arguments``)."""
    view = NormLayer.__new__(NormLayer)
    nn.Module.__init__(view)
    view.dim, view.eps, view.norm, view.backend = norm.dim, norm.eps, norm.norm, norm.backend
    view.weight = copy_to_parallel(norm.weight, group)
    view.bias = copy_to_parallel(norm.bias, group)
    return view


class SequenceParallelEncoderLayer(_SequenceParallelLayer, EncoderLayer):
    pass


class SequenceParallelDecoderLayer(_SequenceParallelLayer, DecoderLayer):
    pass


_LAYER_CLASSES = {
    EncoderLayer: SequenceParallelEncoderLayer,
    DecoderLayer: SequenceParallelDecoderLayer,
}


def _stacks(model: nn.Module) -> list:
    """The ``Encoder``/``Decoder`` stacks of ``model`` (both of an ``EncoderDecoder``, the
    encoder of a ``BEiT3``)."""
    from magneto.beit3 import BEiT3
    from magneto.encoder_decoder import EncoderDecoder

    if isinstance(model, EncoderDecoder):
        return [model.encoder, model.decoder]
    if isinstance(model, BEiT3):
        return [model.encoder]
    return [model]


def check_sequence_parallel(model: nn.Module) -> None:
    """ValueError unless ``model`` is a model sequence parallelism supports."""
    from magneto.stack import Stack

    stacks = _stacks(model)
    if not all(isinstance(stack, Stack) for stack in stacks):
        raise ValueError(
            "sequence parallelism: an Encoder, a Decoder, an EncoderDecoder or a BEiT3, got "
            f"{type(model).__name__}"
        )
    for stack in stacks:
        if any(type(layer) not in _LAYER_CLASSES for layer in stack.layers):
            raise ValueError("sequence parallelism: layers other than magneto's are not supported")


def install(model: nn.Module, group) -> None:
    """Make a tensor-parallel ``Encoder``, ``Decoder`` or ``EncoderDecoder`` sequence-parallel
    (module docstring): each stack splits its first layer's input and gathers its last layer's
    output."""
    for stack in _stacks(model):
        layers = list(stack.layers)
        parts = {}  # the whole sequence's multiway split, set by the first layer
        for i, layer in enumerate(layers):
            for name in ("self_attn", "encoder_attn"):
                if getattr(layer, name, None) is not None:
                    getattr(layer, name).__class__ = SequenceParallelAttention
            ffn = layer.ffn
            for copy in (ffn.A, ffn.B) if isinstance(ffn, Multiway) else (ffn,):
                copy.__class__ = SequenceParallelFeedForward
            layer.__class__ = _LAYER_CLASSES[type(layer)]
            layer.sequence_group, layer.sequence_parts = group, parts
            layer.sequence_split, layer.sequence_join = i == 0, i == len(layers) - 1


def row_output(y: Tensor, bias: Optional[Tensor], dropout_p: float, group) -> Tensor:
    """A row-parallel projection's output on this rank's rows: the partial products
    reduce-scattered, the bias (its gradient all-reduced: each rank adds it to its own rows)
    added, dropout."""
    y = reduce_scatter_sequence(y, group)
    if bias is not None:
        y = y + copy_to_parallel(bias, group)
    return y if dropout_p == 0.0 else sequence_dropout(y, dropout_p, group)
