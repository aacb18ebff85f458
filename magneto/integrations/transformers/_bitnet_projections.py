"""The projection adapter of transformers' ``AutoBitLinear`` (BitNet b1.58's quantised linear,
online and offline): the norm before it, the activation and weight quantisation, the projection
and the residual add as one call of the quantised projection,
``magneto_kernels.quant.ln_linear_bitnet``: its reference formula, transformers' steps in their
dtypes. The integer kernels are not written yet, so this runs PyTorch's ops. ``BitLinear``
(packed 2-bit weights) has no adapter yet.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.integrations.bitnet import AutoBitLinear

import magneto_kernels
from magneto import fusion
from magneto_kernels import quant


class AutoBitLinearProjection:
    """``AutoBitLinear``: online (master weights, quantised each call) or offline (ternary
    weights and ``weight_scale``)."""

    @staticmethod
    def accepts(linear: nn.Module, x: Tensor) -> bool:
        """No hooks, no norm of its own (``use_rms_norm``), x's dtype."""
        return (
            linear.rms_norm is None
            and not fusion.has_hooks(linear)
            and linear.weight.dtype == x.dtype
        )

    @staticmethod
    def call(
        x: Tensor,
        nargs,
        linear: nn.Module,
        options,
        *,
        input_activation: Optional[str] = None,
        residual: Optional[Tensor] = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        """``residual + dropout(linear(norm(in_act(x))))`` as transformers computes it, with
        BitNetRMSNorm's rounding for an RMSNorm."""
        ln_weight, ln_bias, eps, norm = nargs
        if ln_weight is not None and norm == "layer":  # not in BitNet; exact all the same
            a = quant.relu2_glu(x) if input_activation == "relu2_glu" else x
            x = F.layer_norm(a, (a.shape[-1],), ln_weight, ln_bias, eps)
            ln_weight, input_activation = None, None
        online = linear.online_quant
        y = quant.ln_linear_bitnet(
            x,
            ln_weight,
            linear.weight,
            linear.bias,
            quant="bitnet_online" if online else "bitnet_offline",
            weight_scale=None if online else linear.weight_scale,
            eps=eps,
            input_activation=input_activation,
        )
        y = magneto_kernels.dropout(y, dropout_p)
        return y if residual is None else residual + y

    @classmethod
    def group(cls, x: Tensor, nargs, linears, options) -> tuple[Tensor, ...]:
        """One call per projection: the norm and activation quantisation are recomputed in
        each (quantising once per group needs the grouped quantised op, not written yet)."""
        return tuple(cls.call(x, nargs, linear, options) for linear in linears)


PROJECTIONS = {AutoBitLinear: AutoBitLinearProjection}
