"""Norms and projections as ``magneto_kernels.ln_linear`` calls: the projection adapters (one per
linear class), the group call site (one normalised input, several projections) and the output
projection (input activation, norm, projection, dropout and residual add as one call).

Every fused call of the integration is made here, by an adapter of ``PROJECTIONS``; what no
adapter accepts runs as the model's own module, fed by the norm module's output.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import activations

import magneto_kernels
from magneto_kernels.codes import GATED_ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class MagnetoOptions:
    """How a patched model calls the fused ops.

    backend: the ``magneto_kernels`` backend of every call (None: the ops' own choice,
        ``MAGNETO_BACKEND`` or the fastest available).
    concat_min_rows: from this many rows (tokens in the call) on, gate/up and q/k/v run as one
        call on their weights concatenated at call time; below it, one call per projection
        (the norm recomputed in each) and their outputs concatenated. None (the default): one
        call only where no gradient is recorded and rows >= in_features. Why: the two ways
        copy either the weights (2·ffn × hidden for gate/up) or the outputs (rows × 2·ffn), so
        copying the smaller one means concatenating weights from rows = in_features on; and
        where a gradient is recorded, the concatenated weight is a new tensor that ln_linear
        keeps for backward, one more weight-sized tensor per projection group and layer (in
        bench/bench_transformers.py's Kosmos-2 layer, 512 tokens: 24640 B/token saved with
        it, 18512 without), while separate calls share one saved x and add only their row
        statistics. Next to the GEMMs either copy is O(1/hidden) of the work in training and
        prefill; at decode (a few rows) the GEMMs only stream the weights, and copying them
        as well would double that traffic.
    """

    backend: Optional[str] = None
    concat_min_rows: Optional[int] = None


NormArgs = tuple  # (ln_weight, ln_bias, eps, norm): ln_linear's norm arguments
NO_NORM: NormArgs = (None, None, 0.0, "layer")


def norm_args(norm: Optional[nn.Module], rms_norm: Optional[type]) -> Optional[NormArgs]:
    """ln_linear's norm arguments for a norm module it can recompute (``nn.LayerNorm`` with a
    weight, or the family's RMSNorm class ``rms_norm``), None for one it cannot: that one then
    runs as a module, and the projections after it run unfused."""
    if norm is None:
        return NO_NORM
    if norm._forward_hooks or norm._forward_pre_hooks:
        return None
    if type(norm) is nn.LayerNorm:
        if norm.weight is None or len(norm.normalized_shape) != 1:
            return None
        return norm.weight, norm.bias, norm.eps, "layer"
    if rms_norm is not None and type(norm) is rms_norm:
        return norm.weight, None, norm.variance_epsilon, "rms"
    return None


def _ln_linear(x, nargs: NormArgs, weight, bias, options: MagnetoOptions, **kwargs) -> Tensor:
    ln_weight, ln_bias, eps, norm = nargs
    return magneto_kernels.ln_linear(
        x, ln_weight, ln_bias, weight, bias, eps=eps, norm=norm, backend=options.backend, **kwargs
    )


# ----------------------------------------------------------------------------------------------
# Projection adapters: how ln_linear runs a projection of one linear class.


def _cat_bias(linears) -> Optional[Tensor]:
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [
            torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
            if b is None
            else b
            for lin, b in zip(linears, biases)
        ]
    )


def _concat_weights(x: Tensor, linears, options: MagnetoOptions) -> bool:
    """Whether to run projections of one input as one call on concatenated weights
    (``MagnetoOptions.concat_min_rows`` says when and why)."""
    rows = x.numel() // x.shape[-1]
    if options.concat_min_rows is not None:
        return rows >= options.concat_min_rows
    if torch.is_grad_enabled() and (
        x.requires_grad or any(linear.weight.requires_grad for linear in linears)
    ):
        return False
    return rows >= x.shape[-1]


class LinearProjection:
    """``nn.Linear``: ln_linear reads its weight and bias as they are."""

    @staticmethod
    def accepts(linear: nn.Module, x: Tensor) -> bool:
        """Whether this call can read the weight directly: no hooks (offloading hooks move
        it), and x's dtype."""
        return (
            not linear._forward_hooks
            and not linear._forward_pre_hooks
            and linear.weight.dtype == x.dtype
        )

    @staticmethod
    def call(x: Tensor, nargs: NormArgs, linear: nn.Module, options, **kwargs) -> Tensor:
        """``linear(norm(in_act(x)))`` with ln_linear's ``kwargs`` (input activation, dropout,
        residual) as one call."""
        return _ln_linear(x, nargs, linear.weight, linear.bias, options, **kwargs)

    @classmethod
    def group(cls, x: Tensor, nargs: NormArgs, linears, options, *, concat: bool):
        """``[linear(norm(x)) for linear in linears]`` (concatenated along the last dimension
        for ``concat``): one call on the weights concatenated at call time, or one call each."""
        if _concat_weights(x, linears, options):
            weight = torch.cat([linear.weight for linear in linears])
            y = _ln_linear(x, nargs, weight, _cat_bias(linears), options)
            return y if concat else list(y.split([lin.out_features for lin in linears], dim=-1))
        outs = [cls.call(x, nargs, linear, options) for linear in linears]
        return torch.cat(outs, dim=-1) if concat else outs


PROJECTIONS = {nn.Linear: LinearProjection}
"""Linear class (exactly: not its subclasses) -> its adapter. A projection of another class
(BitNet's quantised ``AutoBitLinear`` and ``BitLinear``, PEFT's LoRA layers, any wrapper) runs
as its own module, fed by the norm module's output, and ``apply_magneto`` names it in a warning."""


def _adapter(linear: nn.Module, x: Tensor):
    adapter = PROJECTIONS.get(type(linear))
    return adapter if adapter is not None and adapter.accepts(linear, x) else None


def project(
    module, x: Tensor, norm: Optional[nn.Module], linears: Sequence[nn.Module], *, concat=False
):
    """The group call site: ``[linear(norm(x)) for linear in linears]`` (q/k/v, gate/up, fc1),
    each fused with the norm where an adapter accepts it; ``concat``: the outputs concatenated
    along the last dimension instead. ``module``: the patched module making the call (its
    options, its family's RMSNorm class)."""
    options = module._magneto_options
    nargs = norm_args(norm, module._rms_norm)
    adapters = [None if nargs is None else _adapter(linear, x) for linear in linears]
    first = adapters[0]
    if len(linears) > 1 and first is not None and all(a is first for a in adapters):
        return first.group(x, nargs, linears, options, concat=concat)
    outs, h = [], None
    for linear, adapter in zip(linears, adapters):
        if adapter is not None:
            outs.append(adapter.call(x, nargs, linear, options))
        else:
            if h is None:  # the norm's own output, computed once for every unfused projection
                h = x if norm is None else norm(x)
            outs.append(linear(h))
    if not concat:
        return outs
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


# ----------------------------------------------------------------------------------------------
# The output projection: input activation, norm, projection, dropout and residual add.


def _activation_name(act_fn: Optional[nn.Module]) -> Optional[str]:
    """The ops' name for a transformers activation module, None for one they do not have."""
    kind = type(act_fn)
    if kind is activations.GELUActivation:
        return "gelu"  # erf GELU, whether torch's or the Python formula
    if kind in (activations.GELUTanh, activations.NewGELUActivation):
        return "gelu_tanh"
    if kind in (nn.SiLU, activations.SiLUActivation):
        return "silu"
    if kind is nn.ReLU:
        return "relu"
    if kind is activations.ReLUSquaredActivation:
        return "relu2"
    return None


_GATED_OF = {gate: gated for gated, gate in GATED_ACTIVATIONS.items()}


def apply_activation(x: Tensor, act_fn: nn.Module, gated: bool) -> Tensor:
    if not gated:
        return act_fn(x)
    gate, up = x.chunk(2, dim=-1)
    return act_fn(gate) * up


def output_projection(
    module,
    x: Tensor,
    linear: nn.Module,
    *,
    norm: Optional[nn.Module] = None,
    act_fn: Optional[nn.Module] = None,
    gated: bool = False,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``residual + dropout(linear(norm(a)))`` with ``a = act_fn(x)``, or ``act_fn(gate)·up`` for
    ``gated`` (x = [gate | up]); one ln_linear where the adapter of ``linear`` and the norm allow
    it. An activation the ops lack runs as the model's module before the fused call."""
    in_act = None
    if act_fn is not None:
        name = _activation_name(act_fn)
        in_act = _GATED_OF.get(name) if gated else name
        if in_act is None:
            x, act_fn = apply_activation(x, act_fn, gated), None
    nargs = norm_args(norm, module._rms_norm)
    adapter = None if nargs is None else _adapter(linear, x)
    if adapter is not None:
        return adapter.call(
            x,
            nargs,
            linear,
            module._magneto_options,
            input_activation=in_act,
            residual=residual,
            dropout_p=dropout_p,
        )
    if act_fn is not None:
        x = apply_activation(x, act_fn, gated)
    if norm is not None:
        x = norm(x)
    y = magneto_kernels.dropout(linear(x), dropout_p)
    return y if residual is None else residual + y
