"""Row kernels: LayerNorm / RMSNorm forward (optionally fused with the Post-LN residual add
``s = alpha·residual + x`` or with an input activation), the norm backward (input-activation
derivative and accumulation into an existing gradient included), and the deterministic
two-stage column reduction used for dgamma, dbeta and dbias.

With a gated input activation (``GATED``, ln_linear's prologue and norm backward) x's rows are
``[gate | up]``, twice the norm's width N: a = act(gate)·up is formed on load
(``activations.input_activation``) and dx is written as [dgate | dup], 2N wide. GATED is a
constexpr, so the other kernels compile as if it did not exist. Inputs are read with their row
strides; outputs are written contiguous.

All arithmetic is float32 whatever the storage dtype (values are cast right after ``tl.load``,
which also keeps the interpreter away from bf16 arithmetic). Rows up to ``MAX_FUSED_WIDTH`` wide
(``MAX_FUSED_WIDTH_BACKWARD`` in the backward, half that for a gated row) are held in registers
in one block; wider rows are processed in chunks of ``CHUNK`` columns, the statistics merged
chunk by chunk (Chan et al.), so widths 1..65536 (and more) work.
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

# The norm-kind codes of ``codes.NORMS`` as the kernels compare them.
LAYER_NORM: tl.constexpr = tl.constexpr(NORMS["layer"])
RMS_NORM: tl.constexpr = tl.constexpr(NORMS["rms"])
NO_NORM: tl.constexpr = tl.constexpr(NORMS["none"])

MAX_FUSED_WIDTH = 8192
MAX_FUSED_WIDTH_BACKWARD = 4096  # the backward keeps ~7 row vectors live: wider rows spill
CHUNK = 4096


def row_block(width: int, max_fused: int = MAX_FUSED_WIDTH) -> tuple[int, bool, int]:
    """(BLOCK_N, SINGLE, num_warps) for rows of ``width`` columns: one in-register block up to
    ``max_fused`` columns, else CHUNK-wide chunks; the warps give each thread 16 columns of the
    block, at most 16 warps."""
    if width <= max_fused:
        block = triton.next_power_of_2(width)
        single = True
    else:
        block, single = CHUNK, False
    return block, single, min(16, max(1, block // 512))


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
def _load_row_input(
    X,
    RES,
    cols,
    mask,
    alpha,
    N,
    IN_ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    GATED: tl.constexpr,
):
    """The row the norm acts on: in_act(x), or alpha·residual + x for the Post-LN add. GATED:
    X's row is [gate | up], the up half N columns on."""
    a = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        a = alpha * tl.load(RES + cols, mask=mask, other=0.0).to(tl.float32) + a
        # The sum as stored in S (x's dtype): the statistics must be those of the s that the
        # backward normalises again, else a bf16 row of small variance gets xhat of O(1) error.
        a = a.to(X.dtype.element_ty).to(tl.float32)
    up = a  # the up half, when GATED
    if GATED:
        up = tl.load(X + N + cols, mask=mask, other=0.0).to(tl.float32)
    return input_activation(a, up, IN_ACT, GATED, X.dtype.element_ty)


@triton.jit
def _store_normalized(
    Y, GAMMA, BETA, a, mean, rstd, cols, mask, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr
):
    y = (a - mean) * rstd
    if HAS_GAMMA:
        y = y * tl.load(GAMMA + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BETA:
        y = y + tl.load(BETA + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + cols, cast_rn(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(
    X,
    RES,
    Y,
    S,
    GAMMA,
    BETA,
    MEAN,
    RSTD,
    N,
    stride_xm,
    stride_rm,
    eps,
    alpha,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    WRITE_Y: tl.constexpr,
    STORE_M2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """Statistics of one row of a = in_act(x) (or alpha·residual + x, also stored as S), and
    optionally Y = xhat·gamma + beta. RES and S are None without a residual, Y without WRITE_Y,
    MEAN for RMSNorm. N is the width of a, Y and S; x and the residual have row strides
    stride_xm, stride_rm (x is 2N wide when GATED). STORE_M2 (norm_stats): RSTD gets M2 instead."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_xm
    if HAS_RES:
        RES += row * stride_rm
        S += row * N
    if WRITE_Y:
        Y += row * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        a = _load_row_input(X, RES, cols, mask, alpha, N, IN_ACT, HAS_RES, GATED)
        if HAS_RES:
            tl.store(S + cols, cast_rn(a, S.dtype.element_ty), mask=mask)
        if NORM == LAYER_NORM:
            mean = tl.sum(a, axis=0) / N
            d = tl.where(mask, a - mean, 0.0)
            m2 = tl.sum(d * d, axis=0)
        else:
            mean = 0.0
            m2 = tl.sum(a * a, axis=0)
    else:
        # Pass 1: per-chunk (count, mean, M2) merged into the row's (mean, M2) — no cancellation
        # from a one-pass sum of squares even when |mean| >> std.
        mean = 0.0
        m2 = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            a = _load_row_input(X, RES, cols, mask, alpha, N, IN_ACT, HAS_RES, GATED)
            if HAS_RES:
                tl.store(S + cols, cast_rn(a, S.dtype.element_ty), mask=mask)
            count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            if NORM == LAYER_NORM:
                chunk_mean = tl.sum(a, axis=0) / count
                d = tl.where(mask, a - chunk_mean, 0.0)
                total = start + count
                delta = chunk_mean - mean
                mean += delta * (count / total)
                m2 += tl.sum(d * d, axis=0) + delta * delta * (start * (count / total))
            else:
                m2 += tl.sum(a * a, axis=0)
        if NORM != LAYER_NORM:
            mean = 0.0
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    if NORM == LAYER_NORM:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, m2 if STORE_M2 else rstd)
    if WRITE_Y:
        if SINGLE:
            _store_normalized(Y, GAMMA, BETA, a, mean, rstd, cols, mask, HAS_GAMMA, HAS_BETA)
        else:
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                a = _load_row_input(X, RES, cols, mask, alpha, N, IN_ACT, HAS_RES, GATED)
                _store_normalized(Y, GAMMA, BETA, a, mean, rstd, cols, mask, HAS_GAMMA, HAS_BETA)


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


def _launch_row_kernel(kernel, programs, num_warps, flags, **args):
    """Launch a row kernel over ``programs`` programs with ``num_warps`` warps: the width-based
    choice of row_block, not autotuned (each candidate would be one more compile to check)."""
    tile = configs.Tile((), num_warps)
    configs.launch(kernel, lambda meta: (programs,), [tile], (), **args, **flags)


def norm_forward(
    x, gamma, beta, eps, norm, *, residual=None, alpha=1.0, input_activation="none", write_y=True,
    store_m2=False,
):  # fmt: skip
    """Row statistics and (optionally) y = N(a) for 2-D x, with a = alpha·residual + x when
    ``residual`` is given and a = in_act(x) otherwise (for a gated input activation x is
    [gate | up] and a half as wide).

    Returns (y, s, mean, rstd): y is None unless ``write_y``; s (= a, rounded to x's dtype) is
    None unless ``residual`` is given; mean is empty for RMSNorm, both stats empty for "none".
    ``store_m2``: rstd's place holds the rows' M2 instead (norm_stats).
    """
    in_act = input_activation_args(input_activation)
    x, residual, gamma, beta = rowwise(x, residual, gamma, beta)
    rows, width = x.shape
    if in_act["GATED"]:
        width //= 2
    device = x.device
    mean = new_buffer((rows if norm == "layer" else 0,), torch.float32, device)
    rstd = new_buffer((rows if norm != "none" else 0,), torch.float32, device)
    y = new_buffer((rows, width), x.dtype, device) if write_y else None
    s = new_buffer(x.shape, x.dtype, device) if residual is not None else None
    if rows == 0 or (norm == "none" and not write_y):
        return y, s, mean, rstd
    if norm == "none":
        raise ValueError("norm_forward: norm='none' has nothing to normalise")
    block, single, warps = row_block(width)
    flags = dict(
        NORM=NORMS[norm],
        **in_act,
        HAS_RES=residual is not None,
        HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None,
        WRITE_Y=write_y,
        STORE_M2=store_m2,
        BLOCK_N=block,
        SINGLE=single,
    )
    _launch_row_kernel(
        _norm_fwd_kernel,
        rows,
        warps,
        flags,
        X=x,
        RES=residual,
        Y=y,
        S=s,
        GAMMA=gamma,
        BETA=beta,
        MEAN=mean if norm == "layer" else None,
        RSTD=rstd,
        N=width,
        stride_xm=x.stride(0),
        stride_rm=0 if residual is None else residual.stride(0),
        eps=eps,
        alpha=alpha,
    )
    return y, s, mean, rstd


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


# ------------------------------------------------------------------------ op implementations
# The op schemas keep torch's names: their ``weight``/``bias`` are the kernels' gamma/beta.


def layer_norm(x, weight, bias, eps, norm):
    y, _, mean, rstd = norm_forward(x, weight, bias, eps, norm)
    return y, mean, rstd


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm, output_mask):
    return norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm, output_mask)


def add_layer_norm(x, residual, weight, bias, eps, alpha, norm):
    y, s, mean, rstd = norm_forward(x, weight, bias, eps, norm, residual=residual, alpha=alpha)
    return y, s, mean, rstd
