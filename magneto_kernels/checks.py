"""The op families' argument checks for the backends whose op boundary is Python: the triton
family's ops (``triton/__init__.py``) and the reference backend (``ops.py``).

Word for word, and in the same order, what the native family's ops check in C++
(``csrc/checks.cpp``, and ``csrc/module.cpp`` for the argument types), so that a bad call gets
the same error on every backend (tests/test_ops_overhead_semantics.py holds them to it). Each
function takes an op's arguments in schema order (``library.SCHEMAS``), raises TypeError for an
argument of the wrong type and ValueError for a wrong value, both naming the argument, and
returns the arguments by name (``library.Signature.bind``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from magneto_kernels.backends import KERNEL_DTYPES
from magneto_kernels.codes import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    NORMS,
    QUANT_PACK_UNIT,
    QUANTS,
)
from magneto_kernels.library import SIGNATURES

_NUMBER_TYPES = (int, float)
# A list argument's message (as csrc/module.cpp words it) and whether its items may be None.
_LIST_TYPES = {
    "Tensor[]": ("a list of Tensors", False),
    "Tensor?[]": ("a list of Tensors or None", True),
}


def _quoted(names, last: str) -> str:
    """'a', 'b' or 'c' (``last`` before the final name)."""
    names = [repr(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + last + names[-1]


def _shape(shape) -> str:
    return str(tuple(shape))


def _check_types(signature, args) -> None:
    """The types the schema declares, as the typed call converts them (TypeError)."""
    for name, type_, value in zip(signature.names, signature.types, args):
        if type_ == "Tensor" and not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
        if type_ == "Tensor?" and value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(value).__name__}")
        if type_ == "float" and not isinstance(value, _NUMBER_TYPES):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if type_ == "str" and not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if type_ == "bool" and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if type_ in _LIST_TYPES:
            want, allows_none = _LIST_TYPES[type_]
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if not isinstance(item, Tensor) and not (allows_none and item is None):
                    raise TypeError(f"{name} must be {want}, got {type(item).__name__}")


def _bind(op: str, args: tuple):
    signature = SIGNATURES[op]
    if len(args) > len(signature.names):
        raise TypeError(f"{op} takes {len(signature.names)} arguments, got {len(args)}")
    a = signature.bind(args)
    _check_types(signature, a)
    return a


# ------------------------------------------------------------------------------------ names


def _norm(name: str, allow_none: bool) -> None:
    if name in NORMS and (allow_none or name != "none"):
        return
    names = [n for n in NORMS if allow_none or n != "none"]
    raise ValueError(f"norm must be {_quoted(names, ' or ')}, got {name!r}")


def _activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {_quoted(ACTIVATIONS, ', ')}, got {name!r}")


def _input_activation(name: str) -> None:
    if name not in ACTIVATIONS and name not in GATED_ACTIVATIONS:
        names = _quoted([*ACTIVATIONS, *GATED_ACTIVATIONS], ", ")
        raise ValueError(f"input_activation must be one of {names}, got {name!r}")


def _quant(name: str) -> None:
    if name not in QUANTS:
        raise ValueError(f"quant must be one of {_quoted(QUANTS, ', ')}, got {name!r}")


# ---------------------------------------------------------------------------------- tensors


def _input(x: Tensor, reference: bool) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {_shape(x.shape)}")
    if reference:
        if not x.is_floating_point():
            raise ValueError(f"x must have a floating-point dtype, got {x.dtype}")
    elif x.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"x must have dtype torch.float32, torch.bfloat16 or torch.float16, got {x.dtype}"
        )


def _like(t: Tensor, name: str, x: Tensor, shape, dtype=None) -> None:
    """t on x's device, of this shape and dtype (x's when not given)."""
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {_shape(shape)}, got {_shape(t.shape)}")
    if dtype is None and t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _param(t, name: str, x: Tensor, cols: int) -> None:
    """A norm parameter: (cols,), x's dtype or float32, on x's device."""
    if t is None:
        return
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if tuple(t.shape) != (cols,):
        raise ValueError(f"{name} must have shape {_shape((cols,))}, got {_shape(t.shape)}")
    if x.dtype == torch.float32 and t.dtype != torch.float32:
        raise ValueError(f"{name} must have dtype torch.float32, got {t.dtype}")
    if t.dtype != x.dtype and t.dtype != torch.float32:
        raise ValueError(f"{name} must have x's dtype {x.dtype} or torch.float32, got {t.dtype}")


def _norm_params(gamma, beta, norm: str, x: Tensor, gamma_name: str, beta_name: str, cols: int):
    _param(gamma, gamma_name, x, cols)
    _param(beta, beta_name, x, cols)
    if beta is not None and norm == "rms":
        raise ValueError(f"{beta_name} must be None for norm='rms' (RMSNorm has no bias)")
    if beta is not None and gamma is None:
        raise ValueError(f"{beta_name} given without {gamma_name}")
    if gamma is not None and norm == "none":
        raise ValueError(f"{gamma_name} must be None for norm='none'")


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The statistics' dtype: float32 (float64 for the reference backend's float64 x)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _stats(mean: Tensor, rstd: Tensor, norm: str, x: Tensor) -> None:
    rows = x.numel() // x.shape[-1]
    if norm == "layer":
        _like(mean, "mean", x, (rows,), _stat_dtype(x))
    if norm != "none":
        _like(rstd, "rstd", x, (rows,), _stat_dtype(x))


def _weight_scale(weight_scale, quant: str, x: Tensor) -> None:
    """The offline modes' stored scale (required), the online mode's whole weight's mean|W|
    (optional: tensor parallelism), None without quant: (1,), x's dtype or float32."""
    if quant == "none":
        if weight_scale is not None:
            raise ValueError(f"weight_scale must be None for quant={quant!r}")
        return
    if quant != "bitnet_online" and weight_scale is None:
        raise ValueError(f"quant={quant!r} needs weight_scale, a tensor of shape (1,)")
    _param(weight_scale, "weight_scale", x, 1)


def _row_amax(row_amax, quant: str, x: Tensor) -> None:
    """The quantised modes' per-row max|h| over every shard: (rows,) in the statistics dtype."""
    if row_amax is None:
        return
    if quant == "none":
        raise ValueError("row_amax needs quant (BitNet's quantised modes)")
    _like(row_amax, "row_amax", x, (x.numel() // x.shape[-1],), _stat_dtype(x))


def _eps(eps: float) -> None:
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {float(eps)}")


def _dropout(seed, p: float, x: Tensor) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {float(p)}")
    if p == 0.0:
        return
    if seed is None:
        raise ValueError("seed must be given when dropout_p > 0")
    _like(seed, "seed", x, (), torch.int64)


def _in_features(x: Tensor, input_activation: str) -> int:
    """The width of ln_linear's norm and GEMM operand: x's, or half of it for a gated input
    activation (x = [gate | up])."""
    features = x.shape[-1]
    if input_activation not in GATED_ACTIVATIONS:
        return features
    if features % 2:
        raise ValueError(
            f"input_activation={input_activation!r} needs x = [gate | up] with an even last"
            f" dimension, got shape {_shape(x.shape)}"
        )
    return features // 2


def _weight(weight: Tensor, x: Tensor, in_features: int) -> None:
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(
            f"weight must have shape (out_features, {in_features}), got {_shape(weight.shape)}"
        )
    _like(weight, "weight", x, weight.shape)


_OFFLINE = ("bitnet_offline", "bitlinear")


def _packed_weight(
    weight: Tensor, x: Tensor, in_features: int, quant: str, name: str = "weight"
) -> None:
    """The offline modes' packed weight (``quant.pack``): (out_features, in_features / 4)."""
    if in_features % QUANT_PACK_UNIT:
        raise ValueError(
            f"quant={quant!r} needs in_features a multiple of {QUANT_PACK_UNIT}, got {in_features}"
        )
    if weight.dim() != 2 or weight.shape[1] != in_features // 4:
        raise ValueError(
            f"{name} must have shape (out_features, {in_features // 4}) for quant={quant!r}"
            f" (packed: magneto_kernels.quant.pack), got {_shape(weight.shape)}"
        )
    _like(weight, name, x, weight.shape, torch.uint8)


def _ln_linear_common(a, reference: bool) -> None:
    """What ln_linear and its backward share: x, the names, the norm's parameters, the weight."""
    _input(a.x, reference)
    _norm(a.norm, True)
    _input_activation(a.input_activation)
    _activation(a.activation)
    _quant(a.quant)
    in_features = _in_features(a.x, a.input_activation)
    _norm_params(a.ln_weight, a.ln_bias, a.norm, a.x, "ln_weight", "ln_bias", in_features)
    if a.quant != "none" and (
        a.norm == "layer"
        or a.input_activation not in ("none", "relu2_glu")
        or a.activation != "none"
    ):
        raise ValueError(
            f"quant={a.quant!r} takes norm='rms' or no norm, input_activation 'none' or"
            " 'relu2_glu' and no output activation (BitNet's)"
        )
    if a.quant in _OFFLINE:
        _packed_weight(a.weight, a.x, in_features, a.quant)
    else:
        _weight(a.weight, a.x, in_features)


def _output_mask(mask, n: int) -> None:
    if len(mask) != n:
        raise ValueError(f"output_mask must have {n} entries, got {len(mask)}")


# -------------------------------------------------------------------------------------- ops


def layer_norm(*args, reference: bool = False):
    a = _bind("layer_norm", args)
    _input(a.x, reference)
    _norm(a.norm, False)
    _norm_params(a.weight, a.bias, a.norm, a.x, "weight", "bias", a.x.shape[-1])
    _eps(a.eps)
    return a


def add_layer_norm(*args, reference: bool = False):
    a = _bind("add_layer_norm", args)
    _input(a.x, reference)
    _norm(a.norm, False)
    _like(a.residual, "residual", a.x, a.x.shape)
    _norm_params(a.weight, a.bias, a.norm, a.x, "weight", "bias", a.x.shape[-1])
    _eps(a.eps)
    return a


def layer_norm_backward(*args, reference: bool = False):
    a = _bind("layer_norm_backward", args)
    _input(a.x, reference)
    _norm(a.norm, False)
    _input_activation(a.input_activation)
    cols = _in_features(a.x, a.input_activation)
    _like(a.grad_y, "grad_y", a.x, (*a.x.shape[:-1], cols))
    if a.grad_accum is not None:
        if a.input_activation in GATED_ACTIVATIONS:
            raise ValueError("grad_accum must be None for a gated input_activation")
        _like(a.grad_accum, "grad_accum", a.x, a.x.shape)
    _norm_params(a.weight, a.bias, a.norm, a.x, "weight", "bias", cols)
    _stats(a.mean, a.rstd, a.norm, a.x)
    if a.row_means is not None:
        rows = a.x.numel() // a.x.shape[-1]
        shape = (rows, 2 if a.norm == "layer" else 1)
        _like(a.row_means, "row_means", a.x, shape, _stat_dtype(a.x))
    _output_mask(a.output_mask, 3)
    return a


def norm_stats(*args, reference: bool = False):
    a = _bind("norm_stats", args)
    _input(a.x, reference)
    _norm(a.norm, False)
    _input_activation(a.input_activation)
    _in_features(a.x, a.input_activation)
    return a


def ln_linear(*args, reference: bool = False):
    a = _bind("ln_linear", args)
    x = a.x
    _ln_linear_common(a, reference)
    out_features = a.weight.shape[0]
    if a.bias is not None:
        _like(a.bias, "bias", x, (out_features,))
    if a.residual is not None:
        _like(a.residual, "residual", x, (*x.shape[:-1], out_features))
    _dropout(a.seed, a.dropout_p, x)
    _eps(a.eps)
    if a.quant != "none" and a.dropout_p != 0.0:
        raise ValueError(f"quant={a.quant!r} takes no dropout")
    _weight_scale(a.weight_scale, a.quant, x)
    if (a.mean is None) != (a.rstd is None):
        raise ValueError("mean and rstd must be given together")
    if a.rstd is not None:
        if a.norm == "none":
            raise ValueError("mean and rstd need a norm (ln_weight given)")
        _stats(a.mean, a.rstd, a.norm, x)
    _row_amax(a.row_amax, a.quant, x)
    return a


def ln_linear_backward(*args, op: str = "ln_linear_backward", reference: bool = False):
    a = _bind(op, args)
    x = a.x
    _ln_linear_common(a, reference)
    if a.quant in _OFFLINE:
        raise NotImplementedError(
            f"ln_linear: quant={a.quant!r} has no backward (inference only); train with"
            " quant='bitnet_online'"
        )
    out_shape = (*x.shape[:-1], a.weight.shape[0])
    _like(a.grad_out, "grad_out", x, out_shape)
    _stats(a.mean, a.rstd, a.norm, x)
    if a.activation != "none":
        _like(a.preact, "preact", x, out_shape)
    _dropout(a.seed, a.dropout_p, x)
    _weight_scale(a.weight_scale, a.quant, x)
    _row_amax(a.row_amax, a.quant, x)
    if op == "ln_linear_backward":
        _output_mask(a.output_mask, 5)
    return a


def ln_linear_backward_partial(*args, reference: bool = False):
    a = ln_linear_backward(*args, op="ln_linear_backward_partial", reference=reference)
    if a.norm == "none" or a.quant in _OFFLINE:
        raise ValueError(
            "ln_linear_backward_partial needs a norm and quant 'none' or 'bitnet_online'"
        )
    _output_mask(a.output_mask, 3)
    return a


def dropout(*args, reference: bool = False):
    a = _bind("dropout", args)
    _input(a.x, reference)
    if not 0.0 <= a.p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {float(a.p)}")
    _like(a.seed, "seed", a.x, (), torch.int64)
    return a


def _ln_linear_group_common(a, reference: bool) -> None:
    """What ln_linear_group and its backward share: x, the norm and its parameters, the quant
    mode, the weights."""
    _input(a.x, reference)
    _norm(a.norm, True)
    _quant(a.quant)
    in_features = a.x.shape[-1]
    _norm_params(a.ln_weight, a.ln_bias, a.norm, a.x, "ln_weight", "ln_bias", in_features)
    if a.quant != "none" and a.norm == "layer":
        raise ValueError(f"quant={a.quant!r} takes norm='rms' or no norm (BitNet's)")
    if len(a.weights) == 0:
        raise ValueError("weights is empty")
    for i, w in enumerate(a.weights):
        if a.quant in _OFFLINE:
            _packed_weight(w, a.x, in_features, a.quant, f"weights[{i}]")
            continue
        if w.dim() != 2 or w.shape[1] != in_features:
            raise ValueError(
                f"weights[{i}] must have shape (out_features, {in_features}), got {_shape(w.shape)}"
            )
        _like(w, f"weights[{i}]", a.x, w.shape)


def _count(count: int, name: str, weights: int) -> None:
    if count != weights:
        raise ValueError(
            f"{count} {name} for {weights} weights (give None for a projection without one)"
        )


def ln_linear_group(*args, reference: bool = False):
    a = _bind("ln_linear_group", args)
    _ln_linear_group_common(a, reference)
    _count(len(a.biases), "biases", len(a.weights))
    for i, (w, b) in enumerate(zip(a.weights, a.biases)):
        if b is not None:
            _like(b, f"biases[{i}]", a.x, (w.shape[0],))
    _eps(a.eps)
    n = len(a.weights)
    if a.quant in _OFFLINE:
        if a.weight_scales is None:
            raise ValueError(
                f"quant={a.quant!r} needs weight_scales, a tensor of shape ({n},): one per weight"
            )
        _param(a.weight_scales, "weight_scales", a.x, n)
    elif a.weight_scales is not None:
        raise ValueError(f"weight_scales must be None for quant={a.quant!r}")
    return a


def ln_linear_group_backward(*args):
    a = _bind("ln_linear_group_backward", args)
    x = a.x
    _ln_linear_group_common(a, False)
    if a.quant in _OFFLINE:
        raise NotImplementedError(
            f"ln_linear_group: quant={a.quant!r} has no backward (inference only); train with"
            " quant='bitnet_online'"
        )
    _count(len(a.grad_outs), "grad_outs", len(a.weights))
    for i, (w, g) in enumerate(zip(a.weights, a.grad_outs)):
        if g is not None:
            _like(g, f"grad_outs[{i}]", x, (*x.shape[:-1], w.shape[0]))
    _stats(a.mean, a.rstd, a.norm, x)
    _output_mask(a.output_mask, 3 + 2 * len(a.weights))
    return a


def check_int8_head(x: Tensor, weight: Tensor, scale: Tensor, bias) -> None:
    """``magneto::int8_head``'s arguments, as csrc/int8_head.cpp checks them."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension, got a scalar")
    if weight.dtype != torch.int8:
        raise TypeError(f"weight must be int8, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape (out_features, {x.shape[-1]}), got {_shape(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != weight.shape[0]:
            raise ValueError(f"{name} must have shape ({weight.shape[0]},), got {_shape(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
