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

import math

import torch

FAMILIES = ("triton", "native")
SELF_CHECKING_FAMILIES = ("native",)
"""The families whose ops check every argument themselves (csrc/api.cpp), with errors naming the
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


def _layer_norm_fake(x, weight, bias, eps, norm):
    return (torch.empty_like(x), *_stats(x, norm))


def _layer_norm_backward_fake(grad_y, x, weight, bias, mean, rstd, grad_accum, norm, output_mask):
    return (
        _grad_like(x, output_mask[0], x),
        _grad_like(weight, output_mask[1], x),
        _grad_like(bias, output_mask[2], x),
    )


def _add_layer_norm_fake(x, residual, weight, bias, eps, alpha, norm):
    return (torch.empty_like(x), torch.empty_like(x), *_stats(x, norm))


def _ln_linear_fake(
    x,
    ln_weight,
    ln_bias,
    weight,
    bias,
    residual,
    seed,
    eps,
    norm,
    input_activation,
    activation,
    alpha,
    dropout_p,
):
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    preact = out.new_empty(out.shape if activation != "none" else (0,))
    return (out, *_stats(x, norm), preact)


def _ln_linear_backward_fake(
    grad_out,
    x,
    ln_weight,
    ln_bias,
    weight,
    mean,
    rstd,
    preact,
    seed,
    norm,
    input_activation,
    activation,
    dropout_p,
    output_mask,
):
    return (
        _grad_like(x, output_mask[0], x),
        _grad_like(ln_weight, output_mask[1], x),
        _grad_like(ln_bias, output_mask[2], x),
        _grad_like(weight, output_mask[3], x),
        weight.new_empty((weight.shape[0],)) if output_mask[4] else x.new_empty((0,)),
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


def _register_autograd(family: str) -> None:
    def layer_norm_setup(ctx, inputs, output):
        x, weight, bias, eps, norm = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.norm = norm

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
        return (
            _empty_to_none(dx, mask[0]),
            _empty_to_none(dw, mask[1]),
            _empty_to_none(db, mask[2]),
            None,
            None,
        )

    def add_layer_norm_setup(ctx, inputs, output):
        x, residual, weight, bias, eps, alpha, norm = inputs
        _, s, mean, rstd = output
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        ctx.norm, ctx.alpha = norm, alpha

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
        return (
            ds if ctx.needs_input_grad[0] else None,
            dres,
            _empty_to_none(dw, mask[1]),
            _empty_to_none(db, mask[2]),
            None,
            None,
            None,
        )

    def ln_linear_setup(ctx, inputs, output):
        (
            x,
            ln_weight,
            ln_bias,
            weight,
            bias,
            residual,
            seed,
            eps,
            norm,
            input_activation,
            activation,
            alpha,
            dropout_p,
        ) = inputs
        _, mean, rstd, preact = output
        ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd, preact, seed)
        ctx.options = (norm, input_activation, activation, dropout_p)
        ctx.alpha = alpha
        ctx.has_bias = bias is not None

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
        grads = [None] * 13
        if any(mask):
            outs = get_op("ln_linear_backward", family)(
                grad_out,
                x,
                ln_weight,
                ln_bias,
                weight,
                mean,
                rstd,
                preact,
                seed,
                *ctx.options,
                mask,
            )
            grads[:5] = [_empty_to_none(g, m) for g, m in zip(outs, mask)]
        if need[5]:
            grads[5] = grad_out if ctx.alpha == 1.0 else grad_out * ctx.alpha
        return tuple(grads)

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
