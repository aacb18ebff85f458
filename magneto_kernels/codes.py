"""The tables every Python layer of magneto_kernels shares: norms, activations, Philox.

One definition each, read by the reference (``reference.py``), the public ops (``ops.py``), the
Triton kernels (``triton/``) and the tests, which enumerate them from here. The integer codes are
the ones the kernels are compiled with; ``csrc/common.h`` holds the same table for C++ and CUDA,
and a test checks that the two agree (``magneto_kernels._C.codes()``).
"""

from __future__ import annotations

from typing import Optional

import torch

NORMS = {"layer": 0, "rms": 1, "none": 2}
"""Norm -> kernel code. "none": no norm (``ln_linear`` with ``ln_weight=None``)."""

QUANTS = {"none": 0, "bitnet_online": 1, "bitnet_offline": 2, "bitlinear": 3}
"""ln_linear's quantised projection -> kernel code (``quant.py`` has BitNet b1.58's formula):
none; ``AutoBitLinear`` with master weights (training); with stored ternary weights and
``weight_scale``; ``BitLinear``. The offline two take the weight packed (``quant.pack``)."""

QUANT_PACK_UNIT = 128
"""The offline modes' in_features must be a multiple of this: the packed weight's block of 128
codes, 32 bytes (``quant.pack`` has the layout)."""

ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "relu2": 5}
"""Activation -> kernel code, for ``activation`` and ``input_activation`` alike. relu2 is
``relu(x)²`` (Primer; BitNet's FFN)."""

GATED_ACTIVATIONS = {"geglu": "gelu", "swiglu": "silu", "relu2_glu": "relu2"}
"""Gated input activation -> the activation of its gate, a key of ACTIVATIONS: with
``x = [gate | up]`` split in two halves of its last dimension, ``in_act(x) = act(gate)·up``.
Only ``ln_linear``'s ``input_activation`` takes them; its x is then twice the weight's width."""

ACTIVATION_ALIASES = {None: "none", "swish": "silu", "identity": "none", "linear": "none"}
"""Other spellings users pass, mapped to a key of ACTIVATIONS."""

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
"""Norm-wise relative tolerance of every backend against the float64 reference, by the dtype of
the tensor compared (docs/design.md, Numerics and tolerances): tests and the report use it."""

# Philox4x32-10 (Salmon et al. 2011): the key increments and round multipliers.
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10

_U32 = 0xFFFFFFFF


def canonical_activation(name: Optional[str]) -> str:
    """Map user spellings (None, 'swish', ...) to a key of ACTIVATIONS; ValueError otherwise."""
    name = ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {tuple(ACTIVATIONS) + ('swish', None)}, got {name!r}"
        )
    return name


def dropout_threshold(p: float) -> int:
    """Integer threshold t: an element is kept iff its 32-bit Philox word is >= t."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return min(int(p * 4294967296.0), _U32)
