"""The public ops: argument checks, backend choice, and the call into an op family.

Each function accepts any number of leading (batch) dimensions, checks its arguments with errors
that name the argument, picks a backend (``backends.resolve_backend``) and either runs the
pure-PyTorch reference or calls the backend family's ``torch.library`` op, which takes the
leading dimensions as rows itself (flattening here and viewing back cost ~3 µs per tensor).
Dropout seeds are drawn here, from torch's generator on x's device, so ``torch.manual_seed``
makes every backend draw the same mask.

A decode-size kernel takes a few µs to tens of µs, so the path around it is kept to a few µs
(``bench/bench_overhead.py`` measures it): ops are looked up once, each tensor attribute is read
once, nothing is flattened or viewed back, the native family's ops check their arguments
themselves (``_OP_CHECKS``), and calls that want no gradient skip the triton family's Python
Autograd kernel (``_below_python_autograd``; the native family's is C++ and does that itself).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from magneto_kernels import reference
from magneto_kernels.backends import FAMILY, resolve_backend
from magneto_kernels.codes import (
    GATED_ACTIVATIONS,
    canonical_activation,
    canonical_input_activation,
)
from magneto_kernels.library import PYTHON_AUTOGRAD_FAMILIES, SELF_CHECKING_FAMILIES, get_op


def _below_python_autograd(op):
    """``op``, called without its Python Autograd kernel when no gradient is wanted.

    For such a call that kernel (``library._autograd_kernel``) only redispatches below the
    Autograd key, but reaching it from the dispatcher costs ~5 µs (arguments converted to Python
    objects and back); entering the same guard here costs under 1 µs. Calls that record a graph,
    and every call torch.compile traces, go through the op as registered.
    """

    def call(*args):
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
        ):
            return op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call


# What each (public op, backend) calls, made once rather than looked up by name on every call.
_OPS = {
    (op, backend): (
        _below_python_autograd(get_op(op, family))
        if family in PYTHON_AUTOGRAD_FAMILIES
        else get_op(op, family)
    )
    for backend, family in FAMILY.items()
    for op in ("layer_norm", "add_layer_norm", "ln_linear")
}


try:
    from magneto_kernels import _C
except ImportError:  # no native backend then: resolve_backend never picks one
    _C = None

# The native ops through the extension's typed calls (_C.call_<op>): the same dispatch as the
# torch.ops op without boxing the arguments, ~4 µs of a decode-size call. Used where nothing
# between the call and the dispatcher could need Python: outside torch.compile, and when no
# argument has a __torch_function__ and no torch function mode is on (_direct).
_DIRECT = (
    {}
    if _C is None
    else {op: getattr(_C, "call_" + op) for op in ("layer_norm", "add_layer_norm", "ln_linear")}
)
_has_torch_function = torch._C._has_torch_function
assert SELF_CHECKING_FAMILIES == ("native",), "_DIRECT holds the native family's calls only"


def _direct(op: str, backend: str, args: tuple):
    """The callable for ``args`` on a self-checking backend (see _OP_CHECKS), not compiling."""
    return _OPS[op, backend] if _has_torch_function(args) else _DIRECT[op]


def _check_tensor(
    name: str, t: Optional[Tensor], device: torch.device, shape: tuple, dtypes: tuple
) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point Tensor")


def _check_norm_kind(norm: str) -> None:
    if norm != "layer" and norm != "rms":
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")


def _check_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    norm: str,
    prefix: str = "",
    width: Optional[int] = None,
) -> None:
    """The norm's arguments, x already checked by _check_x; ``width``: the normalised width,
    x's last dimension unless given."""
    shape = x.shape
    if len(shape) < 1 or shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(shape)}")
    _check_norm_kind(norm)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight is None and bias is None:
        return
    width, device = (shape[-1] if width is None else width,), x.device
    param_dtypes = (x.dtype, torch.float32)
    _check_tensor(prefix + "weight", weight, device, width, param_dtypes)
    _check_tensor(prefix + "bias", bias, device, width, param_dtypes)
    if norm == "rms" and bias is not None:
        raise ValueError(f"{prefix}bias must be None for norm='rms' (RMSNorm has no bias)")
    if bias is not None and weight is None:
        raise ValueError(f"{prefix}bias given without {prefix}weight")


def _draw_seed(x: Tensor) -> Tensor:
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)


# The backends whose op checks every argument itself (csrc/api.cpp: shapes, dtypes, devices,
# contiguity, the options), with errors naming the same arguments. For them the public function
# runs its own checks only when the op refuses a call (to say what is wrong in the public API's
# words) instead of before every call: ~2-4 µs of a decode-size call. torch.compile traces the
# checks-first path, which costs nothing once compiled.
_OP_CHECKS = frozenset(b for b, family in FAMILY.items() if family in SELF_CHECKING_FAMILIES)
# What an op call raises for arguments it refuses (TypeError: not a Tensor where the schema wants
# one; AttributeError: .contiguous() of one that is not a Tensor).
_REFUSALS = (ValueError, TypeError, RuntimeError, AttributeError)


def _checked_by_op(backend: str) -> bool:
    return backend in _OP_CHECKS and not torch.compiler.is_compiling()


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
    _check_x(x)
    backend = resolve_backend(backend, x)
    if _checked_by_op(backend):
        try:
            args = (x.contiguous(), weight, bias, float(eps), norm)
            return _direct("layer_norm", backend, args)(*args)[0]
        except _REFUSALS:
            _check_norm(x, weight, bias, eps, norm)
            raise
    _check_norm(x, weight, bias, eps, norm)
    if backend == "reference":
        return reference.layer_norm(x, weight, bias, eps, norm=norm)
    return _OPS["layer_norm", backend](x.contiguous(), weight, bias, float(eps), norm)[0]


def _check_add_layer_norm(x, residual, weight, bias, eps, norm) -> None:
    _check_norm(x, weight, bias, eps, norm)
    _check_tensor("residual", residual, x.device, x.shape, (x.dtype,))
    if residual is None:
        raise ValueError("residual must be a Tensor")


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    norm: str = "layer",
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Post-LN / DeepNorm residual: returns ``(N(alpha·residual + x), alpha·residual + x)``."""
    _check_x(x)
    backend = resolve_backend(backend, x)
    if _checked_by_op(backend):
        try:
            args = _add_layer_norm_args(x, residual, weight, bias, eps, alpha, norm)
            y, s, _, _ = _direct("add_layer_norm", backend, args)(*args)
            return y, s
        except _REFUSALS:
            _check_add_layer_norm(x, residual, weight, bias, eps, norm)
            raise
    _check_add_layer_norm(x, residual, weight, bias, eps, norm)
    if backend == "reference":
        return reference.add_layer_norm(x, residual, weight, bias, eps, alpha=alpha, norm=norm)
    y, s, _, _ = _OPS["add_layer_norm", backend](
        *_add_layer_norm_args(x, residual, weight, bias, eps, alpha, norm)
    )
    return y, s


def _add_layer_norm_args(x, residual, weight, bias, eps, alpha, norm) -> tuple:
    """The op's arguments."""
    return (x.contiguous(), residual.contiguous(), weight, bias, float(eps), float(alpha), norm)


def _check_ln_linear(
    x, ln_weight, ln_bias, weight, bias, residual, eps, norm, input_activation, dropout_p
) -> None:
    """ln_linear's arguments, x already checked by _check_x and the activations canonical."""
    x_shape = x.shape
    in_features = x_shape[-1] if x_shape else 0
    if input_activation in GATED_ACTIVATIONS:
        if in_features % 2:
            raise ValueError(
                f"input_activation={input_activation!r} needs x = [gate | up] with an even last"
                f" dimension, got shape {tuple(x_shape)}"
            )
        in_features //= 2
    if ln_weight is None:
        if ln_bias is not None:
            raise ValueError("ln_bias given without ln_weight")
    else:
        _check_norm(x, ln_weight, ln_bias, eps, norm, prefix="ln_", width=in_features)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D Tensor (out_features, in_features)")
    out_features = weight.shape[0]
    device, dtypes = x.device, (x.dtype,)
    _check_tensor("weight", weight, device, (out_features, in_features), dtypes)
    _check_tensor("bias", bias, device, (out_features,), dtypes)
    if residual is not None:
        _check_tensor("residual", residual, device, (*x_shape[:-1], out_features), dtypes)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


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
    """
    input_activation = canonical_input_activation(input_activation)
    activation = canonical_activation(activation)
    _check_x(x)
    _check_norm_kind(norm)  # the op sees "none" for ln_weight=None, not the norm asked for
    backend = resolve_backend(backend, x)
    call = (x, ln_weight, ln_bias, weight, bias, residual, eps, norm)
    if _checked_by_op(backend):
        try:
            args = _ln_linear_args(*call, input_activation, activation, alpha, dropout_p)
            return _direct("ln_linear", backend, args)(*args)[0]
        except _REFUSALS:
            _check_ln_linear(*call, input_activation, dropout_p)
            raise
    _check_ln_linear(*call, input_activation, dropout_p)
    if backend == "reference":
        return reference.ln_linear(
            *call[:5],
            eps=eps,
            norm=norm,
            input_activation=input_activation,
            activation=activation,
            residual=residual,
            alpha=alpha,
            dropout_p=dropout_p,
            seed=_draw_seed(x) if dropout_p > 0.0 else None,
        )
    args = _ln_linear_args(*call, input_activation, activation, alpha, dropout_p)
    return _OPS["ln_linear", backend](*args)[0]


def _ln_linear_args(
    x, ln_weight, ln_bias, weight, bias, residual, eps, norm, input_activation, activation, alpha,
    dropout_p
):  # fmt: skip
    """The op's arguments, a dropout seed drawn when dropout is on."""
    return (
        x.contiguous(),
        ln_weight,
        ln_bias,
        weight.contiguous(),
        bias,
        None if residual is None else residual.contiguous(),
        _draw_seed(x) if dropout_p > 0.0 else None,
        float(eps),
        "none" if ln_weight is None else norm,
        input_activation,
        activation,
        float(alpha),
        float(dropout_p),
    )


def activation(x: Tensor, name: Optional[str]) -> Tensor:
    """``name``'s activation of x (a key of ``codes.ACTIVATIONS`` or an alias), as the fused ops
    apply it: for the unfused paths of modules."""
    return reference.apply_activation(x, canonical_activation(name))


def dropout(x: Tensor, p: float) -> Tensor:
    """Philox dropout of x with a seed drawn from torch's generator on x's device: the mask the
    fused ops draw for the same seed and shape. Identity when ``p == 0``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return reference.dropout(x, p, _draw_seed(x) if p > 0.0 else None)
