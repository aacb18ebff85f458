"""Triton kernels of the ``triton`` op family (see ``magneto_kernels.library``).

Importing this package registers the kernels. Under ``TRITON_INTERPRET=1`` (set before import)
they run on CPU tensors in Triton's interpreter.

Modules: ``philox`` (Philox4x32-10 dropout stream), ``activations``, ``norm`` (row kernels:
LayerNorm/RMSNorm forward and backward, add-LayerNorm, deterministic column sums), ``ln_linear``
(the fused norm → GEMM → epilogue op and its backward).

Launch convention: an absent tensor is passed as None next to a constexpr ``HAS_*``/``WANT_*``
flag (Triton specialises None as a constexpr, so the kernel never sees a placeholder pointer);
long launches take one keyword argument per line; autotuned kernels are held in each module's
``_TUNED`` dict, keyed by the plain kernel.

float32 GEMMs follow ``torch.get_float32_matmul_precision()``: "highest" (PyTorch's default)
runs ``tl.dot`` with ``input_precision="ieee"`` (exact fp32 products, like torch.matmul);
"high"/"medium" allow TF32 (~5e-4 relative error, much faster on tensor cores).
"""

import torch

from magneto_kernels.library import op_name
from magneto_kernels.triton import ln_linear as _ln_linear
from magneto_kernels.triton import norm as _norm
from magneto_kernels.triton.common import INTERPRET  # noqa: F401  (read by backends.py)

_IMPLS = {
    "layer_norm": _norm.layer_norm,
    "layer_norm_backward": _norm.layer_norm_backward,
    "add_layer_norm": _norm.add_layer_norm,
    "ln_linear": _ln_linear.ln_linear,
    "ln_linear_backward": _ln_linear.ln_linear_backward,
}

for _op, _impl in _IMPLS.items():
    torch.library.register_kernel(op_name(_op, "triton"), None, _impl)
