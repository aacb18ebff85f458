"""Triton kernels of the ``triton`` op family (see ``magneto_kernels.library``).

Importing this package registers the kernels. Under ``TRITON_INTERPRET=1`` (set before import)
they run on CPU tensors in Triton's interpreter.

Modules: ``philox`` (Philox4x32-10 dropout stream), ``activations``, ``norm`` (row kernels:
LayerNorm/RMSNorm forward, add-LayerNorm), ``norm_backward`` (their backward, deterministic
column sums), ``ln_linear`` (the fused norm → GEMM → epilogue op and its backward), ``dropout``
(the dropout op),
``group`` (``ln_linear_group``: one norm for several weights, one launch) and
``group_backward`` (its backward, one launch per gradient), ``quant`` (BitNet's quantised
``ln_linear``, ``quant=``).

Launch convention: an absent tensor is passed as None next to a constexpr ``HAS_*``/``WANT_*``
flag (Triton specialises None as a constexpr, so the kernel never sees a placeholder pointer);
long launches take one keyword argument per line; autotuned kernels are held in each module's
``_TUNED`` dict, keyed by the plain kernel. Every op runs under ``torch.cuda.device`` of its
tensors, so that its launches go to their device's current stream whatever device is current.

float32 GEMMs follow ``torch.get_float32_matmul_precision()``: "highest" (PyTorch's default)
runs ``tl.dot`` with ``input_precision="ieee"`` (exact fp32 products, like torch.matmul);
"high"/"medium" allow TF32 (~5e-4 relative error, much faster on tensor cores).
"""

import functools

import torch

from magneto_kernels import checks
from magneto_kernels.library import op_name
from magneto_kernels.triton import dropout as _dropout
from magneto_kernels.triton import group as _group
from magneto_kernels.triton import group_backward as _group_backward
from magneto_kernels.triton import ln_linear as _ln_linear
from magneto_kernels.triton import norm as _norm
from magneto_kernels.triton import norm_backward as _norm_backward
from magneto_kernels.triton import quant as _quant
from magneto_kernels.triton.common import INTERPRET  # noqa: F401  (read by backends.py)
from magneto_kernels.triton.common import new_buffer as _new_buffer

# The op boundary: each op checks its arguments (checks.py, as the native family's ops do in
# C++), then gives the kernels contiguous tensors, x and the tensors row-for-row with it as
# (rows, features) matrices (the ops take (*, features) and any strides; magneto_kernels.library),
# and returns outputs with x's leading dimensions.


def _rows(t):
    """t contiguous and as (rows, features); None and placeholders (1-D, empty) as they are."""
    if t is None or (t.dim() == 1 and t.numel() == 0):
        return t
    t = t.contiguous()
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def _row_view(t):
    """t as (rows, features) with unit column stride and any row stride, a view where it can be
    (a column slice of a wider tensor stays one), else as ``_rows``."""
    if t is None or t.dim() < 2 or t.stride(-1) != 1:
        return _rows(t)
    return t.reshape(-1, t.shape[-1])


def _dense(t):
    """t contiguous (the kernels read a vector's elements one after another); None as it is."""
    return None if t is None else t.contiguous()


_ROW_ARGS = {"x": _rows, "residual": _rows, "grad_y": _rows, "grad_out": _rows, "preact": _rows,
             "grad_accum": _rows, "grad_outs": _row_view, "weights": lambda w: w}  # fmt: skip
"""The arguments the kernels take row for row with x (``_rows``; the group's output gradients
as ``_row_view``, its weights as given: its GEMMs read both with their strides); every other
tensor argument is made ``_dense``."""


def _for_kernels(a):
    """The checked arguments ``a`` (a namedtuple; lists element by element) as the kernels take
    them (``_ROW_ARGS``); the arguments that are not tensors as they are."""

    def convert(name, v):
        if isinstance(v, (list, tuple)):
            return [convert(name, t) for t in v]
        return _ROW_ARGS.get(name, _dense)(v) if isinstance(v, torch.Tensor) else v

    return a._replace(**{name: convert(name, v) for name, v in a._asdict().items()})


def _like(out, x):
    """A (rows, features) output with x's leading dimensions; an absent one (1-D, empty) as it
    is. Not an autograd view of the kernel's buffer (the view is taken below the ADInplaceOrView
    key, as the C++ kernels take theirs): an op's output must stay modifiable in place."""
    if x.dim() == 2 or out.dim() != 2:
        return out
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return out.view(*x.shape[:-1], out.shape[-1])


def _layer_norm_op(*args):
    a = checks.layer_norm(*args)
    y, mean, rstd = _norm.layer_norm(*_for_kernels(a))
    return _like(y, a.x), mean, rstd


_SHARDED_ARGS = ("input_activation", "row_means")  # layer_norm_backward's last arguments


def _layer_norm_backward_op(*args):
    a = checks.layer_norm_backward(*args)
    k = _for_kernels(a)
    dx, dweight, dbias = _norm_backward.norm_backward(
        *k[: -len(_SHARDED_ARGS)], input_activation=k.input_activation, row_means=k.row_means
    )
    return _like(dx, a.x), dweight, dbias


def _add_layer_norm_op(*args):
    a = checks.add_layer_norm(*args)
    y, s, mean, rstd = _norm.add_layer_norm(*_for_kernels(a))
    return _like(y, a.x), _like(s, a.x), mean, rstd


# ln_linear's last arguments, not the dense GEMM's: the quantised projection's (triton/quant.py)
# and the given statistics (stats=), and its backward's
_QUANT_ARGS = ("quant", "weight_scale", "mean", "rstd", "row_amax")
_QUANT_BACKWARD_ARGS = ("quant", "weight_scale", "row_amax")


def _ln_linear_op(*args):
    a = checks.ln_linear(*args)
    k = _for_kernels(a)
    if a.quant != "none":
        out, mean, rstd, preact = _quant.ln_linear(
            k.x, k.ln_weight, k.weight, k.bias, k.residual, k.eps, k.norm, k.input_activation,
            k.alpha, k.quant, k.weight_scale, k.rstd, k.row_amax,
        )  # fmt: skip
        return _like(out, a.x), mean, rstd, preact
    out, mean, rstd, preact = _ln_linear.ln_linear(
        *k[: -len(_QUANT_ARGS)], stats=None if k.rstd is None else (k.mean, k.rstd)
    )
    return _like(out, a.x), mean, rstd, _like(preact, a.x)


def _ln_linear_backward_op(*args):
    a = checks.ln_linear_backward(*args)
    k = _for_kernels(a)
    if a.quant != "none":  # bitnet_online: the checks refuse the offline modes' backward
        grads = _quant.ln_linear_backward(
            k.grad_out, k.x, k.ln_weight, k.weight, k.rstd, k.norm, k.input_activation,
            k.output_mask, k.weight_scale, k.row_amax,
        )  # fmt: skip
        return (_like(grads[0], a.x), *grads[1:])
    grads = _ln_linear.ln_linear_backward(*k[: -len(_QUANT_BACKWARD_ARGS)])
    return (_like(grads[0], a.x), *grads[1:])


def _norm_stats_op(*args):
    a = checks.norm_stats(*args)
    _, _, mean, m2 = _norm.norm_forward(
        _rows(a.x), None, None, 0.0, a.norm, input_activation=a.input_activation, write_y=False,
        store_m2=True,
    )  # fmt: skip
    return mean, m2


def _ln_linear_backward_partial_op(*args):
    a = checks.ln_linear_backward_partial(*args)
    want_dh, want_dweight, want_dbias = (bool(m) for m in a.output_mask)
    rows, x = a.x.numel() // a.x.shape[-1], a.x
    row_sums = _new_buffer((rows, 2 if a.norm == "layer" else 1), torch.float32, x.device)
    k = _for_kernels(a)
    mask = [False, False, False, want_dweight, want_dbias]
    if a.quant != "none":  # bitnet_online: the checks refuse the offline modes
        dh, _, _, dweight, dbias = _quant.ln_linear_backward(
            k.grad_out, k.x, k.ln_weight, k.weight, k.rstd, k.norm, k.input_activation, mask,
            k.weight_scale, k.row_amax, row_sums if want_dh else None,
        )  # fmt: skip
    else:
        dh, _, _, dweight, dbias = _ln_linear.ln_linear_backward(
            *k._replace(output_mask=mask)[: -len(_QUANT_BACKWARD_ARGS)],
            row_sums=row_sums if want_dh else None,
        )
    empty = x.new_empty((0,))
    if not want_dh:
        return empty, empty, dweight, dbias
    return _like(dh, x), row_sums, dweight, dbias


def _dropout_op(*args):
    a = checks.dropout(*args)
    return _dropout.dropout(a.x.contiguous(), a.seed, a.p)


def _ln_linear_group_op(*args):
    a = checks.ln_linear_group(*args)
    outs, mean, rstd = _group.ln_linear_group(*_for_kernels(a))
    return [_like(out, a.x) for out in outs], mean, rstd


def _ln_linear_group_backward_op(*args):
    a = checks.ln_linear_group_backward(*args)
    dx, *grads = _group_backward.ln_linear_group_backward(*_for_kernels(a))
    return (_like(dx, a.x), *grads)


_IMPLS = {
    "layer_norm": _layer_norm_op,
    "layer_norm_backward": _layer_norm_backward_op,
    "add_layer_norm": _add_layer_norm_op,
    "ln_linear": _ln_linear_op,
    "ln_linear_backward": _ln_linear_backward_op,
    "norm_stats": _norm_stats_op,
    "ln_linear_backward_partial": _ln_linear_backward_partial_op,
    "dropout": _dropout_op,
    "ln_linear_group": _ln_linear_group_op,
    "ln_linear_group_backward": _ln_linear_group_backward_op,
}


def _on_its_device(impl):
    """impl under its first tensor's CUDA device: Triton launches on the current device's current
    stream, which for a tensor on another GPU than the current one is the wrong device. (The
    ops check that every tensor is on the first one's device.)"""

    @functools.wraps(impl)
    def run(*args):
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor) or first.device.type != "cuda":
            return impl(*args)
        with torch.cuda.device(first.device):
            return impl(*args)

    return run


for _op, _impl in _IMPLS.items():
    torch.library.register_kernel(op_name(_op, "triton"), None, _on_its_device(_impl))
