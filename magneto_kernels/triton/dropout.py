"""The ``dropout`` op in Triton: ``y = x ⊙ keep/(1-p)`` with the fused ops' Philox mask
(``philox.dropout_keep``), element i of x (row-major) kept iff ``philox(seed, i) >= threshold``.
The op's backward is the same kernel on the gradient with the same seed (csrc/autograd.cpp)."""

import triton
import triton.language as tl

from magneto_kernels.triton import configs, gemm
from magneto_kernels.triton.activations import cast_rn
from magneto_kernels.triton.common import new_buffer
from magneto_kernels.triton.philox import dropout_keep

BLOCK, WARPS = 1024, 4
"""Elements per program: 8 per thread at 4 warps, each holding four Philox words while it runs."""


@triton.jit
def _dropout_kernel(X, SEED, Y, numel, threshold, scale, BLOCK: tl.constexpr):
    """Y = X ⊙ keep/(1-p) over contiguous X and Y of numel elements, in float32, rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(dropout_keep(SEED, offs, threshold), x * scale, 0.0)
    tl.store(Y + offs, cast_rn(y, Y.dtype.element_ty), mask=mask)


def dropout(x, seed, p):
    """x contiguous; y contiguous, of x's shape and dtype."""
    y = new_buffer(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return y
    threshold, scale = gemm.dropout_args(p)
    configs.launch(
        _dropout_kernel,
        lambda meta: (triton.cdiv(x.numel(), BLOCK),),
        [configs.Tile((("BLOCK", BLOCK),), WARPS)],
        (),
        X=x,
        SEED=seed,
        Y=y,
        numel=x.numel(),
        threshold=threshold,
        scale=scale,
    )
    return y
