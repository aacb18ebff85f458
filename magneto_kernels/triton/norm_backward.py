"""The norm backward row kernel (input-activation derivative, accumulation into an existing
gradient and tensor parallelism's given row means included) and the deterministic two-stage
column reduction used for dgamma, dbeta and dbias. The forward, and what holds for both (gated
rows, float32 arithmetic, chunked wide rows), is ``norm.py``.
"""

import torch
import triton
import triton.language as tl

from magneto_kernels.codes import NORMS
from magneto_kernels.triton import configs
from magneto_kernels.triton.activations import (
    ACT_NONE,
    activation_grad,
    cast_rn,
    gated_activation_grad,
    input_activation,
    input_activation_args,
)
from magneto_kernels.triton.common import new_buffer, reduction_programs, rowwise
from magneto_kernels.triton.norm import (
    LAYER_NORM,
    MAX_FUSED_WIDTH_BACKWARD,
    NO_NORM,
    RMS_NORM,
    _launch_row_kernel,
    row_block,
)


def backward_row_block(width: int, gated: bool) -> tuple[int, bool, int]:
    """row_block for the norm backward, with twice the warps (8 columns a thread): it keeps
    more of the row live than the forward (dy, x, g, xhat; with a bf16/fp16 dh the 16-column
    choice spills in ptxas for sm_90a). A gated row also keeps up live and writes both dx
    halves: it stays in registers only up to half MAX_FUSED_WIDTH_BACKWARD."""
    fused = MAX_FUSED_WIDTH_BACKWARD // 2 if gated else MAX_FUSED_WIDTH_BACKWARD
    block, single, warps = row_block(width, fused)
    warps = min(16, 2 * warps)
    # a chunk holds dy, x (and up), g, xhat and the partial sums: 16 warps, 8 columns each
    return block, single, warps if single else 16


@triton.jit
def _input_grad(g, xhat, mean_g, mean_gxhat, rstd, x, NORM: tl.constexpr, IN_ACT: tl.constexpr):
    """dx = da·in_act'(x) of y = N(in_act(x)), from g = dy·gamma and its row means
    ``mean_g``, ``mean_gxhat`` (formulas in ``_norm_bwd_kernel``)."""
    if NORM == LAYER_NORM:
        da = (g - mean_g - xhat * mean_gxhat) * rstd
    elif NORM == RMS_NORM:
        da = (g - xhat * mean_gxhat) * rstd
    else:
        da = g
    if IN_ACT != ACT_NONE:
        da = da * activation_grad(x, IN_ACT)
    return da


@triton.jit
def _store_input_grad(DX, GRAD_ACCUM, cols, mask, dx, HAS_GRAD_ACCUM: tl.constexpr):
    """DX[cols] = dx (+ GRAD_ACCUM[cols]); DX and GRAD_ACCUM point at the row."""
    if HAS_GRAD_ACCUM:
        dx += tl.load(GRAD_ACCUM + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + cols, cast_rn(dx, DX.dtype.element_ty), mask=mask)


@triton.jit
def _store_row_input_grad(
    DX,
    GRAD_ACCUM,
    cols,
    mask,
    N,
    g,
    xhat,
    mean_g,
    mean_gxhat,
    rstd,
    x,
    up,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GRAD_ACCUM: tl.constexpr,
):
    """dx of one chunk of a row into DX (+ GRAD_ACCUM), both pointing at the row; GATED: x and up
    are the row's gate and up halves, and dx goes to both."""
    if GATED:
        da = _input_grad(g, xhat, mean_g, mean_gxhat, rstd, x, NORM, ACT_NONE)
        dgate, dup = gated_activation_grad(da, x, up, IN_ACT)
        _store_input_grad(DX, GRAD_ACCUM, cols, mask, dgate, HAS_GRAD_ACCUM)
        _store_input_grad(DX, GRAD_ACCUM, N + cols, mask, dup, HAS_GRAD_ACCUM)
    else:
        dx = _input_grad(g, xhat, mean_g, mean_gxhat, rstd, x, NORM, IN_ACT)
        _store_input_grad(DX, GRAD_ACCUM, cols, mask, dx, HAS_GRAD_ACCUM)


@triton.jit
def _row_means(ROW_SUMS, ROW_MEANS, row, sum_g, sum_gxhat, N, NORM: tl.constexpr):
    """(mean(g), mean(g·xhat)) of a row, or (ROW_MEANS, the sharded norm) of the whole row over
    every shard; ROW_SUMS receives the row's sums. 2 floats a row, 1 ([g·xhat]) for RMSNorm."""
    per_row: tl.constexpr = 2 if NORM == LAYER_NORM else 1
    if ROW_SUMS is not None:
        if NORM == LAYER_NORM:
            tl.store(ROW_SUMS + per_row * row, sum_g)
        tl.store(ROW_SUMS + per_row * row + per_row - 1, sum_gxhat)
    mean_g, mean_gxhat = sum_g / N, sum_gxhat / N
    if ROW_MEANS is not None:
        if NORM == LAYER_NORM:
            mean_g = tl.load(ROW_MEANS + per_row * row)
        mean_gxhat = tl.load(ROW_MEANS + per_row * row + per_row - 1)
    return mean_g, mean_gxhat


@triton.jit
def _row_chunk(DY, X, cols, mask, mean, rstd, N, IN_ACT: tl.constexpr, GATED: tl.constexpr):
    """(x, up, dy, xhat) of one chunk of a row (DY and X point at the row): x (the gate when
    GATED) and up in float32, dy, and xhat = (in_act(x) - mean)·rstd, 0 outside the row."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    up = x  # the up half, when GATED
    if GATED:
        up = tl.load(X + N + cols, mask=mask, other=0.0).to(tl.float32)
    a = input_activation(x, up, IN_ACT, GATED, X.dtype.element_ty)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    return x, up, dy, tl.where(mask, (a - mean) * rstd, 0.0)


@triton.jit
def _norm_bwd_kernel(
    DY,
    X,
    GAMMA,
    MEAN,
    RSTD,
    GRAD_ACCUM,
    DX,
    DGAMMA_PART,
    DBETA_PART,
    ROW_SUMS,
    ROW_MEANS,
    M,
    N,
    stride_dym,
    stride_xm,
    stride_gm,
    rows_per_prog,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_GRAD_ACCUM: tl.constexpr,
    WANT_DX: tl.constexpr,
    WANT_DGAMMA: tl.constexpr,
    WANT_DBETA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """Backward of y = N(in_act(x)) for a contiguous block of rows per program.

    With xhat = (a - mean)·rstd (a = in_act(x); mean = 0 for RMSNorm), g = dy·gamma and the row
    means mean_g = mean(g), mean_gxhat = mean(g·xhat):
      LayerNorm  da = rstd·(g - mean_g - xhat·mean_gxhat)
      RMSNorm    da = rstd·(g - xhat·mean_gxhat)
      none       da = g
    dx = da·in_act'(x) (+ grad_accum); GATED: dx = [da·up·act'(gate) | da·act(gate)], x, dx and
    grad_accum being 2N wide. dy, x and grad_accum have row strides stride_dym, stride_xm,
    stride_gm; dx is contiguous. Each program writes its own row of dgamma = Σ dy·xhat and
    dbeta = Σ dy partial sums; a second kernel adds the rows up in a fixed order (no atomics).
    The sharded norm's ROW_SUMS, ROW_MEANS: ``_row_means``. Absent tensors (GAMMA, MEAN,
    GRAD_ACCUM, ROW_*, unwanted outputs) are None.
    """
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    if WANT_DGAMMA:
        DGAMMA_PART += pid.to(tl.int64) * N
    if WANT_DBETA:
        DBETA_PART += pid.to(tl.int64) * N
    stride_dxm = N  # dx's row stride
    if GATED:
        stride_dxm = 2 * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_GAMMA:
            gamma = tl.load(GAMMA + cols, mask=mask, other=0.0).to(tl.float32)
        dgamma_acc = tl.zeros([BLOCK_N], tl.float32)
        dbeta_acc = tl.zeros([BLOCK_N], tl.float32)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        mean = 0.0
        rstd = 1.0
        if NORM == LAYER_NORM:
            mean = tl.load(MEAN + row)
        if NORM != NO_NORM:
            rstd = tl.load(RSTD + row)
        dy_row = DY + row64 * stride_dym
        x_row = X + row64 * stride_xm
        grad_accum_row = GRAD_ACCUM
        dx_row = DX
        if HAS_GRAD_ACCUM:
            grad_accum_row += row64 * stride_gm
        if WANT_DX:
            dx_row += row64 * stride_dxm
        if SINGLE:
            x, up, dy, xhat = _row_chunk(dy_row, x_row, cols, mask, mean, rstd, N, IN_ACT, GATED)
            if WANT_DX or ROW_SUMS is not None:
                g = dy
                if HAS_GAMMA:
                    g = g * gamma
                mean_g, mean_gxhat = _row_means(
                    ROW_SUMS, ROW_MEANS, row64, tl.sum(g, axis=0), tl.sum(g * xhat, axis=0), N, NORM
                )
            if WANT_DX:
                _store_row_input_grad(
                    dx_row, grad_accum_row, cols, mask, N, g, xhat, mean_g,
                    mean_gxhat, rstd, x, up, NORM, IN_ACT, GATED, HAS_GRAD_ACCUM,
                )  # fmt: skip
            dgamma_acc += dy * xhat
            dbeta_acc += dy
        else:
            sum_g = 0.0
            sum_gxhat = 0.0
            if WANT_DX or ROW_SUMS is not None:
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = cols < N
                    _, _, g, xhat = _row_chunk(
                        dy_row, x_row, cols, mask, mean, rstd, N, IN_ACT, GATED
                    )
                    if HAS_GAMMA:
                        g = g * tl.load(GAMMA + cols, mask=mask, other=0.0).to(tl.float32)
                    sum_g += tl.sum(g, axis=0)
                    sum_gxhat += tl.sum(g * xhat, axis=0)
            mean_g, mean_gxhat = _row_means(ROW_SUMS, ROW_MEANS, row64, sum_g, sum_gxhat, N, NORM)
            # Partial sums live in this program's own scratch row (read-modify-write), which holds
            # them from the program's second row on. after_first is a block, not the scalar
            # row > row_start: the interpreter splats a scalar comparison to int32 data, which
            # Triton 3.9's interpreter rejects as a load mask.
            after_first = tl.full([BLOCK_N], row, tl.int32) > row_start
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x, up, dy, xhat = _row_chunk(
                    dy_row, x_row, cols, mask, mean, rstd, N, IN_ACT, GATED
                )
                if WANT_DX:
                    g = dy
                    if HAS_GAMMA:
                        g = g * tl.load(GAMMA + cols, mask=mask, other=0.0).to(tl.float32)
                    _store_row_input_grad(
                        dx_row, grad_accum_row, cols, mask, N, g, xhat, mean_g,
                        mean_gxhat, rstd, x, up, NORM, IN_ACT, GATED, HAS_GRAD_ACCUM,
                    )  # fmt: skip
                if WANT_DGAMMA:
                    prev = tl.load(DGAMMA_PART + cols, mask=mask & after_first, other=0.0)
                    tl.store(DGAMMA_PART + cols, prev + dy * xhat, mask=mask)
                if WANT_DBETA:
                    prev = tl.load(DBETA_PART + cols, mask=mask & after_first, other=0.0)
                    tl.store(DBETA_PART + cols, prev + dy, mask=mask)
    if SINGLE:
        if WANT_DGAMMA:
            tl.store(DGAMMA_PART + cols, dgamma_acc, mask=mask)
        if WANT_DBETA:
            tl.store(DBETA_PART + cols, dbeta_acc, mask=mask)


@triton.jit
def _column_sum_kernel(P, OUT, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[n] = Σ_r P[r, n] for a float32 (R, N) array of partial sums, in a fixed order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ptrs = P + rows[:, None].to(tl.int64) * N + cols[None, :]
        acc += tl.load(ptrs, mask=(rows[:, None] < R) & col_mask[None, :], other=0.0)
    tl.store(OUT + cols, cast_rn(tl.sum(acc, axis=0), OUT.dtype.element_ty), mask=col_mask)


def column_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic second stage: the rows of float32 ``partials`` (R, N) summed into (N,)
    ``dtype``."""
    rows, width = partials.shape
    out = new_buffer((width,), dtype, partials.device)
    block_n = min(256, triton.next_power_of_2(width))
    block_r = min(32, triton.next_power_of_2(rows))
    tile = configs.Tile((("BLOCK_R", block_r), ("BLOCK_N", block_n)), num_warps=4)
    grid = (triton.cdiv(width, block_n),)
    configs.launch(
        _column_sum_kernel, lambda meta: grid, [tile], (), P=partials, OUT=out, R=rows, N=width
    )
    return out


# ------------------------------------------------------------------------------ host wrappers


def norm_backward(
    dy, x, gamma, beta, mean, rstd, grad_accum, norm, output_mask, *, input_activation="none",
    row_sums=None, row_means=None,
):  # fmt: skip
    """(dx, dgamma, dbeta) of y = N(in_act(x)) (see ``_norm_bwd_kernel``); ``grad_accum`` is
    added to dx. Unwanted gradients come back as ``x.new_empty((0,))``. dy is as wide as the
    norm: half x's width for a gated input activation. The sharded norm: ``row_sums`` (float32
    (rows, 2), (rows, 1) for RMSNorm) receives the rows' sums of g and g·xhat, ``row_means``
    replaces their means (``_row_means``)."""
    in_act = input_activation_args(input_activation)
    dy, x, gamma, beta, grad_accum = rowwise(dy, x, gamma, beta, grad_accum)
    rows, width = dy.shape
    device = x.device
    want_dx = bool(output_mask[0])
    want_dgamma = bool(output_mask[1]) and gamma is not None
    want_dbeta = bool(output_mask[2]) and beta is not None
    empty = x.new_empty((0,))
    dx = new_buffer(x.shape, x.dtype, device) if want_dx else empty
    if rows == 0:
        zeros = lambda p: torch.zeros_like(p)  # noqa: E731  (sum over no rows)
        return dx, zeros(gamma) if want_dgamma else empty, zeros(beta) if want_dbeta else empty
    if not (want_dx or want_dgamma or want_dbeta or row_sums is not None):
        return empty, empty, empty
    programs = reduction_programs(x, rows)
    rows_per_prog = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_prog)
    dgamma_part = new_buffer((programs, width), torch.float32, device) if want_dgamma else None
    dbeta_part = new_buffer((programs, width), torch.float32, device) if want_dbeta else None
    block, single, warps = backward_row_block(width, in_act["GATED"])
    flags = dict(
        NORM=NORMS[norm],
        **in_act,
        HAS_GAMMA=gamma is not None,
        HAS_GRAD_ACCUM=grad_accum is not None,
        WANT_DX=want_dx,
        WANT_DGAMMA=want_dgamma,
        WANT_DBETA=want_dbeta,
        BLOCK_N=block,
        SINGLE=single,
    )
    _launch_row_kernel(
        _norm_bwd_kernel,
        programs,
        warps,
        flags,
        DY=dy,
        X=x,
        GAMMA=gamma,
        MEAN=mean if norm == "layer" else None,
        RSTD=rstd if norm != "none" else None,
        GRAD_ACCUM=grad_accum,
        DX=dx if want_dx else None,
        DGAMMA_PART=dgamma_part,
        DBETA_PART=dbeta_part,
        ROW_SUMS=row_sums,
        ROW_MEANS=row_means,
        M=rows,
        N=width,
        stride_dym=dy.stride(0),
        stride_xm=x.stride(0),
        stride_gm=0 if grad_accum is None else grad_accum.stride(0),
        rows_per_prog=rows_per_prog,
    )
    dgamma = column_sum(dgamma_part, gamma.dtype) if want_dgamma else empty
    dbeta = column_sum(dbeta_part, beta.dtype) if want_dbeta else empty
    return dx, dgamma, dbeta


# ------------------------------------------------------------------------ op implementation


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm, output_mask):
    return norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm, output_mask)
