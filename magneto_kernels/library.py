"""The torch.library op families: one schema and fake (meta) impl per op, shared by every backend
family, and the description of each op's signature (``Signature``) that the Python code taking
an op's arguments reads.

A dispatch key holds one kernel per op, yet the Triton interpreter and the C++ CPU kernels both
run on CPU tensors, so each backend family gets its own copy of every op (docs/design.md,
Backends and dispatch):

    magneto::ln_linear_triton, magneto::ln_linear_native, ...  (same schema and fake impl)

The family's kernels register themselves on import: ``magneto_kernels.triton`` with
``torch.library.register_kernel`` (checking its arguments with ``checks.py``) and the C++
extension ``magneto_kernels._C`` with ``TORCH_LIBRARY_IMPL(magneto, CPU/CUDA, ...)`` (checking
them in ``csrc/checks.cpp``). Every family's autograd formula is C++ (``csrc/autograd.cpp``,
the Autograd-key kernel ``_C`` registers for each family), so that a call recording a graph
runs no Python between the dispatcher and the kernels. The ops take x, and the tensors
row-for-row with it, as (*, features), rows being all the leading dimensions together, read
their tensors whatever their strides, and return outputs with x's leading dimensions.

Conventions every family implements (docs/design.md, The op contract):
- ``mean`` and ``rstd`` are float32 per-row statistics; ``mean`` is empty (shape (0,)) for
  RMSNorm, both are empty when ``norm == "none"``;
- ``preact`` (the GEMM output before the output activation) is returned, and saved, only when
  ``activation != "none"``; otherwise it is empty;
- gradients a caller did not ask for (``output_mask``) and of absent tensors come back as
  ``x.new_empty((0,))``; ``dbias`` has the linear weight's dtype.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch

FAMILIES = ("triton", "native")

# The forward ops' options have defaults, so that a caller that names its arguments (tests,
# benchmarks) keeps working when an option is added; the backward ops are called by
# csrc/autograd.cpp only, with every argument.
SCHEMAS = {
    "layer_norm": (
        '(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-05, str norm="layer") '
        "-> (Tensor, Tensor, Tensor)"
    ),
    # input_activation and row_means serve the sharded norm (magneto/parallel, docs/design.md's
    # op contract): the norm of in_act(x), and dx from the row means of g and g·xhat over every
    # shard ((rows, 2) float32 [mean(g), mean(g·xhat)]; (rows, 1) for RMSNorm).
    "layer_norm_backward": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        'Tensor? grad_accum, str norm, bool[] output_mask, str input_activation="none", '
        "Tensor? row_means=None) -> (Tensor, Tensor, Tensor)"
    ),
    # The sharded norm's first pass: this shard's (mean, M2) of in_act(x) per row, float32; for
    # RMSNorm mean is empty and M2 the sum of squares.
    "norm_stats": '(Tensor x, str norm="layer", str input_activation="none") -> (Tensor, Tensor)',
    "add_layer_norm": (
        "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps=1e-05, "
        'float alpha=1., str norm="layer") -> (Tensor, Tensor, Tensor, Tensor)'
    ),
    # mean, rstd and row_amax serve tensor parallelism (docs/design.md's op contract): the
    # sharded norm's statistics and the quantised modes' per-row max|h| over every shard (float32
    # (rows,)); weight_scale in "bitnet_online" the whole weight's mean|W|.
    "ln_linear": (
        "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias=None, "
        'Tensor? residual=None, Tensor? seed=None, float eps=1e-05, str norm="layer", '
        'str input_activation="none", str activation="none", float alpha=1., '
        'float dropout_p=0., str quant="none", Tensor? weight_scale=None, Tensor? mean=None, '
        "Tensor? rstd=None, Tensor? row_amax=None) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "ln_linear_backward": (
        "(Tensor grad_out, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, "
        "Tensor mean, Tensor rstd, Tensor preact, Tensor? seed, str norm, str input_activation, "
        'str activation, float dropout_p, bool[] output_mask, str quant="none", '
        "Tensor? weight_scale=None, Tensor? row_amax=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # ln_linear_backward's first half for the sharded norm, its arguments: output_mask is (dh and
    # row_sums, dweight, dbias); row_sums (rows, 2) float32 [Σg, Σg·xhat], g = dh·ln_weight,
    # (rows, 1) [Σg·xhat] for RMSNorm, this shard's.
    "ln_linear_backward_partial": (
        "(Tensor grad_out, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, "
        "Tensor mean, Tensor rstd, Tensor preact, Tensor? seed, str norm, str input_activation, "
        'str activation, float dropout_p, bool[] output_mask, str quant="none", '
        "Tensor? weight_scale=None, Tensor? row_amax=None) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # Its backward is itself on the gradient with the same seed: no backward op.
    "dropout": "(Tensor x, Tensor seed, float p) -> Tensor",
    # One norm for several projections (q/k/v, gate/up): one output per weight, or with concat
    # one output, the projections side by side (*, Σ out_features_i), each written in place
    # (its gradient then reaches the backward as column ranges of one tensor); output_mask is
    # (dx, dln_weight, dln_bias, dweights[0..n), dbiases[0..n)); grad_outs[i] None where
    # outputs[i] got no gradient. quant as ln_linear's, the row quantised once for every weight;
    # weight_scales (n,): the offline modes' scale of each weight (a schema list argument has
    # no None default, hence one tensor).
    "ln_linear_group": (
        "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor[] weights, Tensor?[] biases, "
        'float eps=1e-05, str norm="layer", str quant="none", Tensor? weight_scales=None, '
        "bool concat=False) -> (Tensor[], Tensor, Tensor)"
    ),
    "ln_linear_group_backward": (
        "(Tensor?[] grad_outs, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor[] weights, "
        'Tensor mean, Tensor rstd, str norm, bool[] output_mask, str quant="none") '
        "-> (Tensor, Tensor, Tensor, Tensor[], Tensor[])"
    ),
}


@dataclass(frozen=True)
class Signature:
    """One op's arguments, read once from its schema: their names, types (as the schema
    spells them: "Tensor", "Tensor?", "float", "str", "bool[]") and defaults, and
    ``Args``, a namedtuple type that names the arguments of a call, so that code that takes an
    op's arguments names the ones it uses instead of listing them all."""

    op: str
    names: tuple[str, ...]
    types: tuple[str, ...]
    Args: type

    @classmethod
    def of(cls, op: str, schema: str) -> Signature:
        arguments = torch._C.parse_schema(f"magneto::{op}{schema}").arguments
        names = tuple(a.name for a in arguments)
        types = tuple(_TYPES[str(a.type)] for a in arguments)
        defaults = [a.default_value for a in arguments if a.has_default_value()]
        return cls(op, names, types, collections.namedtuple(f"{op}_args", names, defaults=defaults))

    def bind(self, args) -> tuple:
        """A call's arguments in schema order, by name. Trailing arguments may be left out where
        the schema has defaults, as the dispatcher leaves out the ones equal to their default
        when it calls a Python kernel."""
        return self.Args(*args)


_TYPES = {
    "Tensor": "Tensor",
    "Optional[Tensor]": "Tensor?",
    "float": "float",
    "str": "str",
    "bool": "bool",
    "List[bool]": "bool[]",
    "List[Tensor]": "Tensor[]",
    "List[Optional[Tensor]]": "Tensor?[]",
}

SIGNATURES = {op: Signature.of(op, schema) for op, schema in SCHEMAS.items()}

_lib = torch.library.Library("magneto", "FRAGMENT")


def op_name(op: str, family: str) -> str:
    return f"magneto::{op}_{family}"


def get_op(op: str, family: str):
    return getattr(torch.ops.magneto, f"{op}_{family}").default


# ---------------------------------------------------------------------------- fake (meta) impls


def _row_count(x: torch.Tensor) -> int:
    """x's rows: its leading dimensions together (x is (*, features))."""
    return math.prod(x.shape[:-1])


def _stats(x: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _row_count(x)
    mean = x.new_empty((rows if norm == "layer" else 0,), dtype=torch.float32)
    rstd = x.new_empty((rows if norm != "none" else 0,), dtype=torch.float32)
    return mean, rstd


def _grad_like(t, wanted: bool, x: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape) if t is not None and wanted else x.new_empty((0,))


def _layer_norm_fake(*args):
    a = SIGNATURES["layer_norm"].bind(args)
    return (a.x.new_empty(a.x.shape), *_stats(a.x, a.norm))


def _layer_norm_backward_fake(*args):
    a = SIGNATURES["layer_norm_backward"].bind(args)
    return (
        _grad_like(a.x, a.output_mask[0], a.x),
        _grad_like(a.weight, a.output_mask[1], a.x),
        _grad_like(a.bias, a.output_mask[2], a.x),
    )


def _norm_stats_fake(*args):
    a = SIGNATURES["norm_stats"].bind(args)
    return _stats(a.x, a.norm)  # (mean, M2): the rows' shapes whatever x's width


def _add_layer_norm_fake(*args):
    a = SIGNATURES["add_layer_norm"].bind(args)
    return (a.x.new_empty(a.x.shape), a.x.new_empty(a.x.shape), *_stats(a.x, a.norm))


def _ln_linear_fake(*args):
    a = SIGNATURES["ln_linear"].bind(args)
    out = a.x.new_empty((*a.x.shape[:-1], a.weight.shape[0]))
    preact = out.new_empty(out.shape if a.activation != "none" else (0,))
    return (out, *_stats(a.x, a.norm), preact)


def _ln_linear_backward_fake(*args):
    a = SIGNATURES["ln_linear_backward"].bind(args)
    mask, x = a.output_mask, a.x
    return (
        _grad_like(x, mask[0], x),
        _grad_like(a.ln_weight, mask[1], x),
        _grad_like(a.ln_bias, mask[2], x),
        _grad_like(a.weight, mask[3], x),
        a.weight.new_empty((a.weight.shape[0],)) if mask[4] else x.new_empty((0,)),
    )


def _ln_linear_backward_partial_fake(*args):
    a = SIGNATURES["ln_linear_backward_partial"].bind(args)
    mask, x, rows = a.output_mask, a.x, _row_count(a.x)
    in_features = a.weight.shape[1]
    return (
        x.new_empty((*x.shape[:-1], in_features)) if mask[0] else x.new_empty((0,)),
        x.new_empty((rows, 2 if a.norm == "layer" else 1), dtype=torch.float32)
        if mask[0]
        else x.new_empty((0,)),
        _grad_like(a.weight, mask[1], x),
        a.weight.new_empty((a.weight.shape[0],)) if mask[2] else x.new_empty((0,)),
    )


def _dropout_fake(*args):
    a = SIGNATURES["dropout"].bind(args)
    return a.x.new_empty(a.x.shape)


def _ln_linear_group_fake(*args):
    a = SIGNATURES["ln_linear_group"].bind(args)
    lead, widths = a.x.shape[:-1], [w.shape[0] for w in a.weights]
    outs = [a.x.new_empty((*lead, sum(widths) if a.concat else n)) for n in widths]
    return outs[:1] if a.concat else outs, *_stats(a.x, a.norm)


def _ln_linear_group_backward_fake(*args):
    a = SIGNATURES["ln_linear_group_backward"].bind(args)
    mask, x, n = a.output_mask, a.x, len(a.weights)
    return (
        _grad_like(x, mask[0], x),
        _grad_like(a.ln_weight, mask[1], x),
        _grad_like(a.ln_bias, mask[2], x),
        [_grad_like(w, mask[3 + i], x) for i, w in enumerate(a.weights)],
        [
            w.new_empty((w.shape[0],)) if mask[3 + n + i] else x.new_empty((0,))
            for i, w in enumerate(a.weights)
        ],
    )


_FAKES = {
    "layer_norm": _layer_norm_fake,
    "layer_norm_backward": _layer_norm_backward_fake,
    "norm_stats": _norm_stats_fake,
    "add_layer_norm": _add_layer_norm_fake,
    "ln_linear": _ln_linear_fake,
    "ln_linear_backward": _ln_linear_backward_fake,
    "ln_linear_backward_partial": _ln_linear_backward_partial_fake,
    "dropout": _dropout_fake,
    "ln_linear_group": _ln_linear_group_fake,
    "ln_linear_group_backward": _ln_linear_group_backward_fake,
}


for _family in FAMILIES:
    for _op, _schema in SCHEMAS.items():
        _lib.define(f"{_op}_{_family}{_schema}")
        torch.library.register_fake(op_name(_op, _family), _FAKES[_op], lib=_lib)


# ------------------------------------------------------------------ the int8 output projection

# One op outside the families: decoding's int8 head, y = (x @ weight.T)·scale (+ bias), weight
# int8 (out_features, in_features), scale and bias (out_features,) in x's dtype; no autograd. The
# C++ extension registers its CPU kernel (csrc/int8_head.cpp); ops.py registers the reference
# (checks.py, then reference.py) for every other device.
INT8_HEAD_SCHEMA = "(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None) -> Tensor"


def _int8_head_fake(x, weight, scale, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_lib.define(f"int8_head{INT8_HEAD_SCHEMA}")
torch.library.register_fake("magneto::int8_head", _int8_head_fake, lib=_lib)


# A decoding step's attention over a key/value cache handed in by the caller, fused with the
# cache's copy into the room that keeps it (magneto/kv_cache.py): one op, the C++ CPU kernel's
# (csrc/cpu/decode_attention.cpp), not one per family. Writes key_room = [prev_key; key] and
# value_room = [prev_value; value] along the positions and returns
# softmax(q·key_roomᵀ/√head_dim)·value_room.
_lib.define(
    "decode_attention(Tensor q, Tensor prev_key, Tensor prev_value, Tensor key, Tensor value, "
    "Tensor(a!) key_room, Tensor(b!) value_room) -> Tensor"
)


@torch.library.register_fake("magneto::decode_attention", lib=_lib)
def _decode_attention_fake(q, prev_key, prev_value, key, value, key_room, value_room):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3])).transpose(1, 2)
