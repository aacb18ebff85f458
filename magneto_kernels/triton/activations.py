"""Device helpers: activations and their derivatives (fp32 in, fp32 out), the input activation
(gated or not) built on them, and the rounding cast.

The activation codes are ``magneto_kernels.codes.ACTIVATIONS``; each gets a named constexpr
here, so an added activation is one constant and one branch in each of ``activation`` and
``activation_grad``. A gated input activation (``codes.GATED_ACTIVATIONS``) reaches the kernels
as its gate's code in ``IN_ACT`` plus ``GATED=True`` (``input_activation_args``).
"""

import triton
import triton.language as tl

from magneto_kernels.codes import ACTIVATIONS, GATED_ACTIVATIONS
from magneto_kernels.triton.common import INTERPRET

ACT_NONE: tl.constexpr = tl.constexpr(ACTIVATIONS["none"])
_GELU: tl.constexpr = tl.constexpr(ACTIVATIONS["gelu"])
_GELU_TANH: tl.constexpr = tl.constexpr(ACTIVATIONS["gelu_tanh"])
_RELU: tl.constexpr = tl.constexpr(ACTIVATIONS["relu"])
_SILU: tl.constexpr = tl.constexpr(ACTIVATIONS["silu"])
_RELU2: tl.constexpr = tl.constexpr(ACTIVATIONS["relu2"])

_INTERPRET: tl.constexpr = tl.constexpr(INTERPRET)
_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
_GELU_C: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no overflow to NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def activation(x, ACT: tl.constexpr):
    """``ACT``'s activation of x (ACT_NONE: the identity)."""
    if ACT == _GELU:
        y = 0.5 * x * (1.0 + tl.erf(x * _SQRT1_2))
    elif ACT == _GELU_TANH:
        # Assigned before the call: in the interpreter a constexpr times a tensor stays a
        # constexpr until assigned, and Triton 3.9's tl.exp rejects one passed straight in.
        inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
        y = 0.5 * x * (1.0 + _tanh(inner))
    elif ACT == _RELU:
        y = tl.maximum(x, 0.0)
    elif ACT == _SILU:
        y = x / (1.0 + tl.exp(-x))
    elif ACT == _RELU2:
        r = tl.maximum(x, 0.0)
        y = r * r
    else:
        y = x
    return y


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """d activation(x) / dx (relu'(0) = 0, as PyTorch; relu2'(x) = 2·relu(x))."""
    if ACT == _GELU:
        d = 0.5 * (1.0 + tl.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == _GELU_TANH:
        inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
        t = _tanh(inner)
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
    elif ACT == _RELU:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == _SILU:
        s = 1.0 / (1.0 + tl.exp(-x))
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == _RELU2:
        d = 2.0 * tl.maximum(x, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def cast_rn(x, dtype: tl.constexpr):
    """Cast float32 ``x`` to ``dtype`` rounding to nearest even (as the GPU does).

    Triton 3.6's interpreter truncates float32 → bfloat16 casts, which doubles and biases the
    rounding error; there we round the bit pattern ourselves first, so the truncation is exact.
    """
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def input_activation(x, up, ACT: tl.constexpr, GATED: tl.constexpr, dtype: tl.constexpr):
    """a = in_act(x) of float32 ``x`` loaded from ``dtype`` storage, as float32 ready for the
    norm: ``ACT``'s activation of x, or with GATED act(x)·up (x the gate, ``up`` the up half),
    rounded to ``dtype``, as the reference forms it in x's dtype (and the C++ kernels round
    it). Without an input activation, x itself."""
    if GATED:
        a = cast_rn(activation(x, ACT) * up, dtype).to(tl.float32)
    elif ACT != ACT_NONE:
        a = cast_rn(activation(x, ACT), dtype).to(tl.float32)
    else:
        a = x
    return a


@triton.jit
def gated_activation_grad(da, gate, up, ACT: tl.constexpr):
    """(dgate, dup) = (da·up·act'(gate), da·act(gate)): the gradient at x = [gate | up] of
    a = act(gate)·up, given da, the gradient at a."""
    return da * up * activation_grad(gate, ACT), da * activation(gate, ACT)


def input_activation_args(name: str) -> dict:
    """The kernels' ``IN_ACT`` and ``GATED`` constexprs for ``input_activation`` ``name``: a
    gated one (x = [gate | up]) passes its gate's activation code with ``GATED=True``."""
    gated = name in GATED_ACTIVATIONS
    return {"IN_ACT": ACTIVATIONS[GATED_ACTIVATIONS[name] if gated else name], "GATED": gated}
