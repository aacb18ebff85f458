"""The torch.library op families: one schema, fake (meta) impl and autograd formula per op, shared
by every backend family. The formulas run here, in Python, for the triton family; the native
family runs the same ones in C++ (csrc/autograd.cpp), so that its calls recording a graph cost no
Python between the dispatcher and the kernels.

A dispatch key holds one kernel per op, yet the Triton interpreter and the C++ CPU kernels both
run on CPU tensors, so each backend family gets its own copy of every op (docs/design.md,
Backends and dispatch):

    magneto::ln_linear_triton, magneto::ln_linear_native, ...  (same schema, fake impl, autograd)

The family's kernels register themselves on import: ``magneto_kernels.triton`` with
``torch.library.register_kernel`` and the C++ extension ``magneto_kernels._C`` with
``TORCH_LIBRARY_IMPL(magneto, CPU/CUDA/Autograd, ...)``. Ops take contiguous row-major inputs of
shape (*, features), rows being all the leading dimensions together, and return outputs with x's
leading dimensions; the public functions in ``magneto_kernels.ops`` validate arguments.

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
SELF_CHECKING_FAMILIES = ("native",)
"""The families whose ops check every argument themselves (csrc/checks.cpp), with errors naming the
public arguments; the triton family's kernels trust the public functions' checks."""
PYTHON_AUTOGRAD_FAMILIES = ("triton",)
"""The families whose Autograd-key kernel is the Python one below; the native family's is C++
(csrc/autograd.cpp), registered by magneto_kernels._C."""

SCHEMAS = {
    "layer_norm": (
        "(Tensor x, Tensor? weight, Tensor? bias, float eps, str norm) -> (Tensor, Tensor, Tensor)"
    ),
    "layer_norm_backward": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "Tensor? grad_accum, str norm, bool[] output_mask) -> (Tensor, Tensor, Tensor)"
    ),
    "add_layer_norm": (
        "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, float alpha, "
        "str norm) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "ln_linear": (
        "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, "
        "Tensor? residual, Tensor? seed, float eps, str norm, str input_activation, "
        "str activation, float alpha, float dropout_p) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "ln_linear_backward": (
        "(Tensor grad_out, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, "
        "Tensor mean, Tensor rstd, Tensor preact, Tensor? seed, str norm, str input_activation, "
        "str activation, float dropout_p, bool[] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}


@dataclass(frozen=True)
class Signature:
    """One op's arguments, read once from its schema: their names, types (``kinds``, as the
    schema spells them: "Tensor", "Tensor?", "float", "str", "bool[]") and defaults, and
    ``Args``, a namedtuple type that names the arguments of a call, so that code that takes an
    op's arguments names the ones it uses instead of listing them all."""

    op: str
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    Args: type

    @classmethod
    def of(cls, op: str, schema: str) -> Signature:
        arguments = torch._C.parse_schema(f"magneto::{op}{schema}").arguments
        names = tuple(a.name for a in arguments)
        kinds = tuple(_KINDS[str(a.type)] for a in arguments)
        defaults = [a.default_value for a in arguments if a.has_default_value()]
        return cls(op, names, kinds, collections.namedtuple(f"{op}_args", names, defaults=defaults))

    def bind(self, args) -> tuple:
        """A call's arguments in schema order, by name. Trailing arguments may be left out where
        the schema has defaults, as the dispatcher leaves out the ones equal to their default
        when it calls a Python kernel."""
        return self.Args(*args)


_KINDS = {
    "Tensor": "Tensor",
    "Optional[Tensor]": "Tensor?",
    "float": "float",
    "str": "str",
    "List[bool]": "bool[]",
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
    return torch.empty_like(t) if t is not None and wanted else x.new_empty((0,))


def _layer_norm_fake(*args):
    a = SIGNATURES["layer_norm"].bind(args)
    return (torch.empty_like(a.x), *_stats(a.x, a.norm))


def _layer_norm_backward_fake(*args):
    a = SIGNATURES["layer_norm_backward"].bind(args)
    return (
        _grad_like(a.x, a.output_mask[0], a.x),
        _grad_like(a.weight, a.output_mask[1], a.x),
        _grad_like(a.bias, a.output_mask[2], a.x),
    )


def _add_layer_norm_fake(*args):
    a = SIGNATURES["add_layer_norm"].bind(args)
    return (torch.empty_like(a.x), torch.empty_like(a.x), *_stats(a.x, a.norm))


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


_FAKES = {
    "layer_norm": _layer_norm_fake,
    "layer_norm_backward": _layer_norm_backward_fake,
    "add_layer_norm": _add_layer_norm_fake,
    "ln_linear": _ln_linear_fake,
    "ln_linear_backward": _ln_linear_backward_fake,
}


# ---------------------------------------------------------------------------- autograd formulas


def _empty_to_none(t: torch.Tensor, wanted: bool):
    return t if wanted and t.numel() > 0 else None


def _grads(op: str, **by_name) -> tuple:
    """A backward's gradients in op's argument order: None for the arguments not named."""
    return tuple(by_name.get(name) for name in SIGNATURES[op].names)


def _register_autograd(family: str) -> None:
    def layer_norm_setup(ctx, inputs, output):
        a = SIGNATURES["layer_norm"].bind(inputs)
        _, mean, rstd = output
        ctx.save_for_backward(a.x, a.weight, a.bias, mean, rstd)
        ctx.norm = a.norm

    def layer_norm_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        ]
        dx, dw, db = get_op("layer_norm_backward", family)(
            grad_y.contiguous(), x, weight, bias, mean, rstd, None, ctx.norm, mask
        )
        return _grads(
            "layer_norm",
            x=_empty_to_none(dx, mask[0]),
            weight=_empty_to_none(dw, mask[1]),
            bias=_empty_to_none(db, mask[2]),
        )

    def add_layer_norm_setup(ctx, inputs, output):
        a = SIGNATURES["add_layer_norm"].bind(inputs)
        _, s, mean, rstd = output
        ctx.save_for_backward(s, a.weight, a.bias, mean, rstd)
        ctx.norm, ctx.alpha = a.norm, a.alpha

    def add_layer_norm_backward(ctx, grad_y, grad_s, _grad_mean, _grad_rstd):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [
            True,
            weight is not None and ctx.needs_input_grad[2],
            bias is not None and ctx.needs_input_grad[3],
        ]
        grad_accum = None if grad_s is None else grad_s.contiguous()
        ds, dw, db = get_op("layer_norm_backward", family)(
            grad_y.contiguous(), s, weight, bias, mean, rstd, grad_accum, ctx.norm, mask
        )
        dres = None
        if ctx.needs_input_grad[1]:
            dres = ds if ctx.alpha == 1.0 else ds * ctx.alpha
        return _grads(
            "add_layer_norm",
            x=ds if ctx.needs_input_grad[0] else None,
            residual=dres,
            weight=_empty_to_none(dw, mask[1]),
            bias=_empty_to_none(db, mask[2]),
        )

    def ln_linear_setup(ctx, inputs, output):
        a = SIGNATURES["ln_linear"].bind(inputs)
        _, mean, rstd, preact = output
        ctx.save_for_backward(a.x, a.ln_weight, a.ln_bias, a.weight, mean, rstd, preact, a.seed)
        # The backward op's options (its non-tensor arguments) are the forward's of the same name.
        backward = SIGNATURES["ln_linear_backward"]
        ctx.options = {
            n: v
            for n, v in a._asdict().items()
            if n in backward.names and isinstance(v, (str, float, int))
        }
        ctx.alpha = a.alpha
        ctx.has_bias = a.bias is not None

    def ln_linear_backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_preact):
        x, ln_weight, ln_bias, weight, mean, rstd, preact, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [
            need[0],
            ln_weight is not None and need[1],
            ln_bias is not None and need[2],
            need[3],
            ctx.has_bias and need[4],
        ]
        grad_out = grad_out.contiguous()
        grads = {}
        if any(mask):
            args = SIGNATURES["ln_linear_backward"].Args(
                **ctx.options,
                grad_out=grad_out,
                x=x,
                ln_weight=ln_weight,
                ln_bias=ln_bias,
                weight=weight,
                mean=mean,
                rstd=rstd,
                preact=preact,
                seed=seed,
                output_mask=mask,
            )
            outs = get_op("ln_linear_backward", family)(*args)
            names = ("x", "ln_weight", "ln_bias", "weight", "bias")
            grads = {n: _empty_to_none(g, m) for n, g, m in zip(names, outs, mask)}
        if need[5]:
            grads["residual"] = grad_out if ctx.alpha == 1.0 else grad_out * ctx.alpha
        return _grads("ln_linear", **grads)

    formulas = {
        "layer_norm": (layer_norm_backward, layer_norm_setup),
        "add_layer_norm": (add_layer_norm_backward, add_layer_norm_setup),
        "ln_linear": (ln_linear_backward, ln_linear_setup),
    }
    for op, (backward, setup) in formulas.items():
        name = f"{op}_{family}"
        _lib.impl(
            name,
            _autograd_kernel(name, get_op(op, family), backward, setup),
            "Autograd",
            with_keyset=True,
        )


def _autograd_kernel(name: str, op, backward, setup_context):
    """The Autograd-key kernel ``torch.library.register_autograd(op, backward, setup_context=...)``
    would register (torch/_library/autograd.py), without its per-call costs: that one rebuilds
    the schema's argument list once per argument on every call that records a graph (its
    ``fill_defaults``: ~50 µs for ln_linear's 13 arguments, more than a decode-size kernel) and
    wraps the keyset in a dataclass. Our schemas have no defaults, keyword-only arguments or out
    variants, which is all that machinery serves.

    The keyset travels as the last input of the autograd.Function, as in torch's version;
    ``ctx.needs_input_grad`` then has one trailing entry more, which the formulas, indexing
    from the front, never read.
    """
    after_autograd = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        *inputs, keyset = args
        with torch._C._AutoDispatchBelowAutograd():
            output = op.redispatch(keyset & after_autograd, *inputs)
        setup_context(ctx, inputs, output)
        return output

    def function_backward(ctx, *grads):
        return (*backward(ctx, *grads), None)

    # Built with type() so that grad_fn is named after the op ("ln_linear_<family>Backward").
    function = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(function_backward)},
    )

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & after_autograd, *args)

    return kernel


for _family in FAMILIES:
    for _op, _schema in SCHEMAS.items():
        _lib.define(f"{_op}_{_family}{_schema}")
        torch.library.register_fake(op_name(_op, _family), _FAKES[_op], lib=_lib)
for _family in PYTHON_AUTOGRAD_FAMILIES:
    _register_autograd(_family)
