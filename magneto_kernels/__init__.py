"""magneto_kernels: fused Sub-LayerNorm kernels for Magneto (Foundation Transformer) models.

Public ops (see ``ops.py``; the specification is ``reference.py``):

- ``layer_norm(x, weight, bias, eps=1e-5, *, norm="layer", backend=None)``
- ``add_layer_norm(x, residual, weight, bias, eps=1e-5, *, alpha=1.0, norm="layer", backend=None)``
- ``ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5, norm="layer",
  input_activation=None, activation=None, residual=None, alpha=1.0, dropout_p=0.0, backend=None)``
- ``ln_linear_group(x, ln_weight, ln_bias, weights, biases=None, *, eps=1e-5, norm="layer",
  quant="none", weight_scales=None, backend=None)``: one output per weight, x normalised (and
  quantised) once

``int8_head(x, weight, scale, bias=None)``: decoding's int8 output projection, no gradient.
``activation(x, name)`` and ``dropout(x, p)`` are the unfused pieces modules fall back to.
``available_backends(device)`` says which backends run on a device and why the others do not.
"""

from magneto_kernels import library  # noqa: F401  (defines the torch.library op families)
from magneto_kernels.backends import BACKENDS, ENV_VAR, available_backends, resolve_backend
from magneto_kernels.ops import (
    activation,
    add_layer_norm,
    dropout,
    int8_head,
    layer_norm,
    ln_linear,
    ln_linear_group,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "available_backends",
    "resolve_backend",
    "layer_norm",
    "add_layer_norm",
    "ln_linear",
    "ln_linear_group",
    "activation",
    "dropout",
    "int8_head",
]
