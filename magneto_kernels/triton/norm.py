"""Row kernels: LayerNorm / RMSNorm forward (optionally fused with the Post-LN residual add
``s = alpha·residual + x`` or with an input activation). The backward and the deterministic
column sums are ``norm_backward.py``; what follows holds for both.

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
    cast_rn,
    input_activation,
    input_activation_args,
)
from magneto_kernels.triton.common import new_buffer, rowwise

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


# ------------------------------------------------------------------------ op implementations
# The op schemas keep torch's names: their ``weight``/``bias`` are the kernels' gamma/beta.


def layer_norm(x, weight, bias, eps, norm):
    y, _, mean, rstd = norm_forward(x, weight, bias, eps, norm)
    return y, mean, rstd


def add_layer_norm(x, residual, weight, bias, eps, alpha, norm):
    y, s, mean, rstd = norm_forward(x, weight, bias, eps, norm, residual=residual, alpha=alpha)
    return y, s, mean, rstd
