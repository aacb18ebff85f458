"""Which modules a fused op may stand in for, and the projection that fuses them or falls back.

A fused op reads a module's parameters instead of calling the module: that is what puts a norm
inside the next GEMM and a residual add inside its epilogue. It is right only where calling the
module would compute exactly the op's formula from those parameters. magneto fuses

- an ``nn.Linear`` (the class itself, not a subclass) and, as the norm before it, magneto's
  ``NormLayer``, ``nn.LayerNorm`` or ``nn.RMSNorm`` (one normalised dimension, with a weight),
- parametrized ones too (``torch.nn.utils.parametrize``: the parametrization acts through
  ``.weight``, which is what the op reads),
- none of them when they carry hooks (forward, forward-pre or backward hooks of the module, or
  global module hooks): pruning (``torch.nn.utils.prune``), the old ``weight_norm``, torch.ao
  observers and offloading work through hooks, and hooks fire only when the module is called;
- no ``nn.Linear`` whose weight is a DTensor (a tensor-parallel plan of torch or transformers
  redistributes it in the module's call).

Anything else (PEFT LoRA layers, ``torch.ao`` quantized or QAT modules, a replacement class with
its own forward, an ``nn.Sequential``) is called as a module: the projection runs unfused, and a
one-time ``UnfusedWarning`` names the module (once per module instance; Python's own filter then
shows each distinct message once). The Hugging Face integration applies the same rule.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

import magneto_kernels
from magneto.norm import NormLayer


class UnfusedWarning(UserWarning):
    """A module magneto cannot fuse runs as a module (unfused): correct, but slower."""


NO_NORM = {"ln_weight": None, "ln_bias": None}
"""``ln_linear``'s arguments for no norm in front of the projection."""


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own, or global module hooks)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def _class(module: nn.Module) -> type:
    """The module's class, or the class it had before parametrizations subclassed it."""
    if "parametrizations" in module._modules:  # parametrize.is_parametrized, without its getattr
        return parametrize.type_before_parametrizations(module)
    return type(module)


def fusable_linear(module: nn.Module) -> bool:
    """Whether ``ln_linear`` may read ``module.weight``/``module.bias`` instead of calling it."""
    if _class(module) is not nn.Linear or has_hooks(module):
        return False
    # a DTensor weight (torch's or transformers' tensor-parallel plans) is sharded behind
    # hooks that redistribute it: the module's own call does that, the fused op cannot. No
    # DTensor exists before its module is imported, so nothing is imported for the check.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is None or not isinstance(module.weight, dtensor.DTensor)


def norm_arguments(module: Optional[nn.Module], x: Tensor) -> Optional[dict]:
    """``ln_linear``'s norm arguments (``ln_weight``, ``ln_bias``, ``eps``, ``norm``) for the norm
    ``module`` before a projection of ``x``; ``NO_NORM`` for None; None when the op cannot stand in
    for calling the module."""
    if module is None:
        return NO_NORM
    if has_hooks(module):
        return None
    cls = _class(module)
    if cls is NormLayer:
        return _norm_args(module.weight, module.bias, module.eps, module.norm)
    if cls not in (nn.LayerNorm, nn.RMSNorm) or module.weight is None:
        return None
    if len(module.normalized_shape) != 1:
        return None
    if cls is nn.LayerNorm:
        return _norm_args(module.weight, module.bias, module.eps, "layer")
    eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps  # nn.RMSNorm's default
    return _norm_args(module.weight, None, eps, "rms")


def _norm_args(weight: Tensor, bias: Optional[Tensor], eps: float, norm: str) -> dict:
    return {"ln_weight": weight, "ln_bias": bias, "eps": eps, "norm": norm}


_WARNED = weakref.WeakSet()


def warn_unfused(site: str, module: nn.Module, why: Optional[str] = None) -> None:
    """The one-time ``UnfusedWarning`` for ``module``, at ``site`` (e.g. "FeedForward.fc2");
    ``why``: what it is that the fused ops cannot stand in for (default: its hooks, or its
    class)."""
    if module in _WARNED:
        return
    _WARNED.add(module)
    cls = type(module)
    if why is None:
        why = "has hooks" if has_hooks(module) else f"is a {cls.__module__}.{cls.__qualname__}"
    warnings.warn(
        f"magneto: {site} {why}, which the fused ops cannot stand in for: it runs as a module, "
        "unfused (docs/design.md, The model: what is fused)",
        UnfusedWarning,
        stacklevel=3,
    )


Activation = Union[str, None, Callable[[Tensor], Tensor]]
"""An activation name the ops know (fused), or any callable (applied unfused)."""


def activate(x: Tensor, activation: Activation) -> Tensor:
    """``activation(x)``: the ops' activation for a name, the callable itself otherwise."""
    if callable(activation):
        return activation(x)
    return magneto_kernels.activation(x, activation)


def project(
    site: str,
    x: Tensor,
    linear: nn.Module,
    norm: Optional[nn.Module] = None,
    *,
    input_activation: Activation = None,
    residual: Optional[Tensor] = None,
    alpha: float = 1.0,
    dropout_p: float = 0.0,
    rows: Optional[slice] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``alpha·residual + dropout(linear(norm(in_act(x)))[..., rows])``, one ``ln_linear`` where
    ``linear`` and ``norm`` can be fused; what cannot is called as a module (``site`` names it in
    the warning). ``rows``: a slice of the outputs (of a packed q/k/v projection)."""
    if callable(input_activation):  # an activation with no kernel code runs before the op
        x, input_activation = input_activation(x), None
    parallel = getattr(linear, "parallel_project", None)
    if parallel is not None:  # a tensor-parallel shard (magneto.parallel) adds its collectives
        return parallel(
            x,
            norm,
            input_activation=input_activation,
            residual=residual,
            alpha=alpha,
            dropout_p=dropout_p,
            rows=rows,
            backend=backend,
        )
    norm_args = norm_arguments(norm, x)
    if norm_args is None:
        warn_unfused(f"the norm before {site}", norm)
    if not fusable_linear(linear):
        warn_unfused(site, linear)
        if input_activation is not None:
            x = magneto_kernels.activation(x, input_activation)
        y = linear(x if norm is None else norm(x))
        y = y if rows is None else y[..., rows]
        if dropout_p > 0.0:
            y = magneto_kernels.dropout(y, dropout_p)
        return y if residual is None else alpha * residual + y
    if norm_args is None:
        if input_activation is not None:
            x = magneto_kernels.activation(x, input_activation)
        x, input_activation, norm_args = norm(x), None, NO_NORM
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    return magneto_kernels.ln_linear(
        x,
        weight=weight,
        bias=bias,
        input_activation=input_activation,
        residual=residual,
        alpha=alpha,
        dropout_p=dropout_p,
        backend=backend,
        **norm_args,
    )


def add_norm(
    site: str,
    norm: nn.Module,
    x: Tensor,
    residual: Tensor,
    alpha: float,
    backend: Optional[str],
    residual_in_fp32: bool = False,
) -> Tensor:
    """Post-LN / DeepNorm: ``norm(alpha·residual + x)``, one ``add_layer_norm`` where ``norm`` can
    be fused, else the sum and the norm module's call (``residual_in_fp32``: the sum in float32,
    the result in x's dtype, both ways)."""
    args = norm_arguments(norm, x)
    if args is None or args["ln_weight"] is None:
        warn_unfused(site, norm)
        if residual_in_fp32:
            return norm(alpha * residual.float() + x.float()).to(x.dtype)
        return norm(alpha * residual + x)
    out, _ = magneto_kernels.add_layer_norm(
        x,
        residual,
        args["ln_weight"],
        args["ln_bias"],
        args["eps"],
        alpha=alpha,
        norm=args["norm"],
        residual_in_fp32=residual_in_fp32,
        backend=backend,
    )
    return out
