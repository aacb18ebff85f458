"""Helpers shared by the Triton kernel modules: launch-side, and the kernels' own."""

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

AUTOTUNE = os.environ.get("MAGNETO_TRITON_AUTOTUNE", "1") != "0"
"""On GPUs the GEMMs autotune among their tiles (``configs.launch``) unless
MAGNETO_TRITON_AUTOTUNE=0, which takes the first tile that fits the device (the GPU tests set
it: correctness needs no fastest tile, and every autotuned flag combination costs compiles)."""

POISON = os.environ.get("MAGNETO_POISON", "0") == "1"
"""When True every output and scratch buffer starts as NaN instead of uninitialised memory, so a
kernel that leaves an element unwritten (or reads a partial it never wrote) fails the tests. The
test suite switches it on; it costs a fill per buffer, so it is off by default."""


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """An uninitialised buffer (NaN-filled when POISON is on) for a kernel to write."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def rowwise(*tensors):
    """The tensors as the kernels read them: a 2-D tensor with unit column stride (any row
    stride, which the kernels take) and a 1-D one with unit stride, else a contiguous copy;
    None as it is. The kernels index columns and 1-D parameters as contiguous."""
    return tuple(
        t if t is None or t.numel() <= 1 or t.stride(-1) == 1 else t.contiguous() for t in tensors
    )


@functools.lru_cache(maxsize=None)
def num_programs_for_rows(device_index: int) -> int:
    """Programs for row-reduction kernels that keep per-program partial sums: a few per SM."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_programs(x: torch.Tensor, rows: int) -> int:
    if x.device.type == "cuda":
        return max(1, min(rows, num_programs_for_rows(x.device.index or 0)))
    return max(1, min(rows, 4))


@triton.jit
def max_nan(a, b):
    """max, NaN if either is (Triton's default max returns the other operand): BitNet's row
    amax, where a NaN must make the row's scale and outputs NaN, as transformers' formula does
    (no int8 code carries it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def fp32_dot_precision() -> str:
    """``tl.dot`` input precision for float32 operands, following PyTorch's own matmul setting.

    ``torch.set_float32_matmul_precision("highest")`` (PyTorch's default) gives "ieee": exact
    fp32 products, like torch.matmul. "high" or "medium" give "tf32" (10-bit mantissa inputs,
    ~5e-4 relative error, several times faster on tensor cores). bf16/fp16 operands ignore it.
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _patch_interpreter_for_numpy_2_4() -> None:
    """Let Triton 3.6's interpreter use runtime loop bounds under numpy >= 2.4.

    The interpreter keeps scalar kernel arguments as 1-element numpy arrays and converts them
    with ``int(array)`` in ``tensor.__index__`` (used by ``range(0, N, BLOCK)``); numpy 2.4 made
    that conversion an error for arrays with ndim > 0. We wrap the interpreter's per-launch
    patch so ``__index__`` goes through ``.item()``; its scope restores both on exit (LIFO).
    """
    import numpy as np
    from triton.runtime import interpreter

    if tuple(int(v) for v in np.__version__.split(".")[:2]) < (2, 4):
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "_magneto_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._magneto_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _patch_interpreter_for_numpy_2_4()
