"""The public ops: the backend choice and one call of that backend's op.

Each function takes x with any number of leading (batch) dimensions, picks a backend
(``backends.resolve_backend``) and calls the backend's entry for the op (``_entry``) with the
op's arguments in schema order (``library.SCHEMAS``):

- ``cpu``, ``cuda``, ``triton``: the family's ``torch.library`` op through the extension's typed
  call ``_C.call_<op>_<family>`` (``csrc/module.cpp``: the op's typed dispatcher handle, the
  dispatch of ``torch.ops.magneto.<op>_<family>`` without boxing the arguments; for a tensor
  subclass or under a torch function mode it makes the ``torch.ops`` call itself). Under
  torch.compile, the ``torch.ops`` op, which Dynamo traces.
- ``reference``: ``checks.py``, then ``reference.py``; under ``torch.autocast``, on the
  arguments cast by ``autocast.py``'s rule, which the families' Autocast-key kernels apply.

The ops check their own arguments (``csrc/checks.cpp``, ``checks.py``): nothing is checked here
but what the public API adds to an op, ``ln_linear``'s ``norm`` naming a norm (its op takes
"none" for ``ln_weight=None``). Activation aliases are resolved here (``codes.py``). Dropout
seeds are drawn here, from torch's generator on x's device, so ``torch.manual_seed`` makes every
backend draw the same mask. Nothing is flattened or viewed back: the ops take (*, features).

A decode-size kernel is short, so the path to it is kept short (``bench/bench_overhead.py``
measures it; docs/design.md, Decisions): one cached lookup of the entry, no checks, no
Autograd-key kernel in Python (every family's is C++, ``csrc/autograd.cpp``).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from magneto_kernels import autocast, checks, library, quant, reference
from magneto_kernels.backends import ENV_VAR, EXTENSION, FAMILY, cached_backend, resolve_backend
from magneto_kernels.codes import ACTIVATION_ALIASES, canonical_activation
from magneto_kernels.library import get_op


def _layer_norm_reference(*args):
    a = checks.layer_norm(*autocast.cast_if_enabled("layer_norm", args), reference=True)
    return (reference.layer_norm(a.x, a.weight, a.bias, a.eps, norm=a.norm),)


def _add_layer_norm_reference(*args):
    a = checks.add_layer_norm(*autocast.cast_if_enabled("add_layer_norm", args), reference=True)
    return reference.add_layer_norm(
        a.x, a.residual, a.weight, a.bias, a.eps, alpha=a.alpha, norm=a.norm
    )


def _ln_linear_reference(*args):
    a = checks.ln_linear(*autocast.cast_if_enabled("ln_linear", args), reference=True)
    if a.quant != "none":
        offline = a.quant in quant.OFFLINE_MODES
        out = quant.ln_linear_bitnet(
            a.x,
            a.ln_weight,
            quant.unpack(a.weight, a.x.dtype) if offline else a.weight,
            a.bias,
            quant=a.quant,
            weight_scale=a.weight_scale,
            eps=a.eps,
            input_activation=None if a.input_activation == "none" else a.input_activation,
            residual=a.residual,
            alpha=a.alpha,
            rstd=a.rstd,
            row_amax=a.row_amax,
        )
        return (out,)
    out = reference.ln_linear(
        a.x,
        a.ln_weight,
        a.ln_bias,
        a.weight,
        a.bias,
        eps=a.eps,
        norm=a.norm,
        input_activation=a.input_activation,
        activation=a.activation,
        residual=a.residual,
        alpha=a.alpha,
        dropout_p=a.dropout_p,
        seed=a.seed,
        mean=a.mean,
        rstd=a.rstd,
    )
    return (out,)


def _dropout_reference(*args):
    a = checks.dropout(*args, reference=True)
    return reference.dropout(a.x, a.p, a.seed)


def _ln_linear_group_reference(*args):
    a = checks.ln_linear_group(*autocast.cast_if_enabled("ln_linear_group", args), reference=True)
    weights, biases = list(a.weights), list(a.biases)
    if a.quant != "none":
        if a.quant in quant.OFFLINE_MODES:
            weights = [quant.unpack(w, a.x.dtype) for w in weights]
        outs = quant.ln_linear_group_bitnet(
            a.x, a.ln_weight, weights, biases, quant=a.quant, weight_scales=a.weight_scales,
            eps=a.eps,
        )  # fmt: skip
    else:
        outs = reference.ln_linear_group(
            a.x, a.ln_weight, a.ln_bias, weights, biases, eps=a.eps, norm=a.norm
        )
    # The reference defines concat as the concatenation; the families write in place.
    return ([torch.cat(outs, dim=-1)] if a.concat else outs,)


_REFERENCE = {
    "layer_norm": _layer_norm_reference,
    "add_layer_norm": _add_layer_norm_reference,
    "ln_linear": _ln_linear_reference,
    "dropout": _dropout_reference,
    "ln_linear_group": _ln_linear_group_reference,
}

# What a call of each op on each backend runs: outside torch.compile (_ENTRIES) and while
# tracing (_TRACED), made once rather than looked up by name on every call.
_ENTRIES = {op: {"reference": fn} for op, fn in _REFERENCE.items()}
_TRACED = {op: {"reference": fn} for op, fn in _REFERENCE.items()}
for _op in _REFERENCE:
    for _backend, _family in FAMILY.items():
        _TRACED[_op][_backend] = get_op(_op, _family)
        if EXTENSION is not None:  # else resolve_backend never picks this backend
            _ENTRIES[_op][_backend] = getattr(EXTENSION, f"call_{_op}_{_family}")


def _entry(op: str, backend: Optional[str], x: Tensor):
    """What a call of ``op`` on ``x`` runs (see the top of the file)."""
    if torch.compiler.is_compiling():
        return _TRACED[op][resolve_backend(backend, x)]
    return _ENTRIES[op][cached_backend(backend, x)]


_LOW_PRECISION = (torch.bfloat16, torch.float16)

_FUNCTORCH_REFUSAL = "cannot use C++ torch::autograd::Function with functorch transforms"


def _under_torch_func(op: str, backend: Optional[str], args: tuple, error: RuntimeError):
    """A kernel backend's op under a torch.func transform that differentiates (grad, vjp,
    jacrev, jacfwd, vmap of grad): torch runs no C++ autograd Function there, and every family's
    is C++. With no backend asked for (neither ``backend=`` nor MAGNETO_BACKEND), the call goes
    to the reference backend, which works through plain autograd; else a clear error."""
    if _FUNCTORCH_REFUSAL not in str(error):
        raise error
    if backend is None and not os.environ.get(ENV_VAR):
        return _ENTRIES[op]["reference"](*args)
    asked = repr(backend) if backend is not None else f"{ENV_VAR}={os.environ[ENV_VAR]!r}"
    raise RuntimeError(
        f"{op}: backend {asked} cannot run under torch.func's differentiating transforms "
        "(grad, vjp, jacrev, jacfwd; vmap alone works): its autograd is a C++ function, which "
        "functorch refuses. Pass backend='reference' (or leave the backend unset, which uses "
        "it there)"
    ) from error


def _draw_seed(x: Tensor) -> Tensor:
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    norm: str = "layer",
    backend: Optional[str] = None,
) -> Tensor:
    """LayerNorm (``norm="layer"``) or RMSNorm (``norm="rms"``) over x's last dimension."""
    args = (x, weight, bias, eps, norm)
    try:
        return _entry("layer_norm", backend, x)(*args)[0]
    except RuntimeError as error:
        return _under_torch_func("layer_norm", backend, args, error)[0]


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    norm: str = "layer",
    residual_in_fp32: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Post-LN / DeepNorm residual: returns ``(N(alpha·residual + x), alpha·residual + x)``.

    ``residual_in_fp32``: for bf16/fp16 x, the sum ``s`` is formed, returned and saved for the
    backward in float32 (the norm of an unrounded sum: its gradients, dgamma most, lose less),
    and ``N(s)`` comes back in x's dtype. It runs the float32 op on float32 copies of x, the
    residual and the norm parameters (not fused: three casts more)."""
    if residual_in_fp32 and x.dtype in _LOW_PRECISION:
        x, low = x.float(), x.dtype
        residual, weight, bias = (
            None if t is None else t.float() for t in (residual, weight, bias)
        )
        y, s = add_layer_norm(
            x, residual, weight, bias, eps, alpha=alpha, norm=norm, backend=backend
        )
        return y.to(low), s
    args = (x, residual, weight, bias, eps, alpha, norm)
    try:
        return _entry("add_layer_norm", backend, x)(*args)[:2]
    except RuntimeError as error:
        return _under_torch_func("add_layer_norm", backend, args, error)[:2]


def ln_linear(
    x: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    eps: float = 1e-5,
    norm: str = "layer",
    input_activation: Optional[str] = None,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    alpha: float = 1.0,
    dropout_p: float = 0.0,
    quant: str = "none",
    weight_scale: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``alpha·residual + dropout(act(N(in_act(x)) @ weight.T + bias))``, fused.

    ``N`` is LayerNorm or RMSNorm with parameters ``ln_weight``/``ln_bias``, or nothing when
    ``ln_weight`` is None. ``input_activation`` is applied to x before the norm (fc2 takes fc1's
    preact, so the two share one saved tensor). Activations: the keys of
    ``codes.ACTIVATIONS`` or their ``codes.ACTIVATION_ALIASES`` (None, "swish", ...); the
    input activation may also be gated (``codes.GATED_ACTIVATIONS``: "swiglu", "geglu",
    "relu2_glu"), when x is ``[gate | up]``, twice in_features wide, and
    ``in_act(x) = act(gate)·up``. Only x is saved for the backward: the gated product is
    recomputed. Pass ``dropout_p=0`` outside training.

    ``quant`` (``codes.QUANTS``) makes the projection BitNet b1.58's, as transformers computes
    it (``quant.py``; RMSNorm or no norm, input activation none or relu2_glu): "bitnet_online"
    (AutoBitLinear with master weights: weight and activations fake-quantised,
    straight-through backward), "bitnet_offline" (AutoBitLinear with ternary weights, times
    ``weight_scale``) and "bitlinear" (BitLinear, divided by ``weight_scale``); the offline two
    take the weight packed by ``quant.pack`` and ``weight_scale`` of shape (1,), run integer
    kernels on the cpu backend and have no backward.
    """
    if norm != "layer" and norm != "rms":
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    args = (
        x,
        ln_weight,
        ln_bias,
        weight,
        bias,
        residual,
        _draw_seed(x) if dropout_p > 0.0 else None,
        eps,
        "none" if ln_weight is None else norm,
        ACTIVATION_ALIASES.get(input_activation, input_activation),
        ACTIVATION_ALIASES.get(activation, activation),
        alpha,
        dropout_p,
        quant,
        weight_scale,
        None,  # mean, rstd and row_amax: the op's own (magneto/parallel gives them: every
        None,  # shard's)
        None,
    )
    try:
        return _entry("ln_linear", backend, x)(*args)[0]
    except RuntimeError as error:
        return _under_torch_func("ln_linear", backend, args, error)[0]


def activation(x: Tensor, name: Optional[str]) -> Tensor:
    """``name``'s activation of x (a key of ``codes.ACTIVATIONS`` or an alias), as the fused ops
    apply it: for the unfused paths of modules."""
    return reference.apply_activation(x, canonical_activation(name))


def dropout(x: Tensor, p: float, *, backend: Optional[str] = None) -> Tensor:
    """Philox dropout of x with a seed drawn from torch's generator on x's device: the mask the
    fused ops draw for the same seed and shape (element i of x, row-major, kept iff
    ``philox(seed, i) >= dropout_threshold(p)``). Identity when ``p == 0``. Its gradient is the
    op itself on the gradient, with the same seed."""
    if p == 0.0:
        return x
    args = (x, _draw_seed(x), p)
    try:
        return _entry("dropout", backend, x)(*args)
    except RuntimeError as error:
        return _under_torch_func("dropout", backend, args, error)


def ln_linear_group(
    x: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    weights: Sequence[Tensor],
    biases: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    eps: float = 1e-5,
    norm: str = "layer",
    quant: str = "none",
    weight_scales: Optional[Tensor] = None,
    concat: bool = False,
    backend: Optional[str] = None,
) -> Union[tuple[Tensor, ...], Tensor]:
    """``tuple(N(x) @ w.T + b for w, b in zip(weights, biases))`` as one op: the projections of
    one normalised input (q/k/v, gate/up), each weight its own parameter (no weight is copied).
    ``concat=True`` returns them side by side in one tensor instead, ``torch.cat(outs, -1)``
    bit for bit, each projection written into its columns (no concatenation pass; its gradient
    is read column range by column range, in place): a gated MLP's ``[gate | up]``.
    x is read and normalised once for every weight, and the backward is one for the group: the
    input gradient ``Σ_i dy_i @ W_i`` is summed inside the op before one norm backward.
    ``N`` as in ``ln_linear`` (nothing when ``ln_weight`` is None); ``biases``: None, or one
    entry per weight (None where a projection has no bias). ``quant`` as in ``ln_linear``
    (BitNet's q/k/v and gate/up), the normalised row quantised once for every weight; the
    offline modes take every weight packed and ``weight_scales`` of shape (len(weights),),
    ``weight_scales[i]`` the scale of ``weights[i]``."""
    if norm != "layer" and norm != "rms":
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    args = (
        x,
        ln_weight,
        ln_bias,
        weights,
        [None] * len(weights) if biases is None else biases,
        eps,
        "none" if ln_weight is None else norm,
        quant,
        weight_scales,
        concat,
    )
    try:
        outs = _entry("ln_linear_group", backend, x)(*args)[0]
    except RuntimeError as error:
        outs = _under_torch_func("ln_linear_group", backend, args, error)[0]
    return outs[0] if concat else tuple(outs)


def _int8_head_reference(x, weight, scale, bias=None):
    checks.check_int8_head(x, weight, scale, bias)
    return reference.int8_head(x, weight, scale, bias)


# The C++ extension registers the CPU kernel (csrc/int8_head.cpp); every other device, and the
# CPU without the extension, runs the reference.
torch.library.impl("magneto::int8_head", "CompositeExplicitAutograd", lib=library._lib)(
    _int8_head_reference
)


def _int8_head_backward(ctx, grad):
    raise RuntimeError(
        "magneto::int8_head has no backward: the int8 output projection is for inference (run"
        " the model under torch.no_grad(), or without output_projection='int8' to train)"
    )


# An error at backward, where without an autograd formula the gradient would stop silently.
torch.library.register_autograd(
    "magneto::int8_head", _int8_head_backward, setup_context=lambda ctx, inputs, output: None,
    lib=library._lib,
)  # fmt: skip


def int8_head(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The int8 output projection of decoding: ``(x @ weight.T)·scale (+ bias)``, x (*, K) in
    float32/bf16/fp16, weight int8 (N, K), scale and bias (N,) in x's dtype. The products are
    summed in float32, multiplied by the scale (and the bias added) in float32, and rounded to
    x's dtype once (``reference.int8_head``). No gradient: an inference op."""
    return torch.ops.magneto.int8_head(x, weight, scale, bias)
