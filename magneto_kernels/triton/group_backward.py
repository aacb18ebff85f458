"""``ln_linear_group``'s backward in Triton (the forward is ``group.py``), for up to
``MAX_WEIGHTS`` weights (a longer list in groups of this many, each as one):
  1. ``dh = Σ_i dy_i @ W_i`` in one launch (``_group_dh_kernel``): each program's reduction runs
     over every member's (dy_i, W_i) pair into one float32 accumulator and stores its dh tile
     once (a later group of members adds the sum so far, its epilogue's residual);
  2. every ``dweight_i = dy_i^T @ h`` in one launch (``_group_dweight_kernel``, a grid over
     (member, tile); h recomputed on load, ``gemm._dweight_tile``), whose first column tiles
     also write the bias sums dbias_i from the dy tiles they load (a bias whose weight gets
     no gradient is summed on its own);
  3. one norm backward for the group.
  Each dy_i is read in place with its own row stride (a column slice of one gradient).
Quantised (online, ``bitnet_online``; ``triton/quant.py``): the row scales taken once for every
dweight_i (one ``quant.quant_dweight`` launch and bias sum per weight), dh the one launch above
over the fake-quantised weights.
"""

import torch
import triton
import triton.language as tl

from magneto_kernels.codes import NORMS
from magneto_kernels.triton import configs, gemm
from magneto_kernels.triton import quant as _quant
from magneto_kernels.triton.activations import ACT_NONE
from magneto_kernels.triton.common import new_buffer, rowwise
from magneto_kernels.triton.group import MAX_WEIGHTS
from magneto_kernels.triton.ln_linear import (
    DZ_BLOCK_M,
    DZ_WARPS,
    _linear_epilogue_backward_kernel,
)
from magneto_kernels.triton.norm_backward import column_sum, norm_backward

GROUP_DH_IEEE_TILE = (64, 64, 16, 4, 2)
"""(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the exact-fp32 dh launch above 64 rows."""


@triton.jit
def _dh_member(
    acc,
    DY,
    W,
    N,
    stride_dym,
    stride_wn,
    stride_wk,
    row0,
    col0,
    M,
    K,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + dy[rows, :N] @ W[:N, cols] for the (row0, col0) tile of dh (BLOCK_M x BLOCK_N), W
    (N, K) at W + n·stride_wn + k·stride_wk; BLOCK_K tiles the reduction over N."""
    lm = tl.arange(0, BLOCK_M)
    lk = tl.arange(0, BLOCK_N)
    rn = tl.arange(0, BLOCK_K)
    m_mask = row0 + lm < M
    k_mask = col0 + lk < K
    dy_ptrs = DY + row0 * stride_dym + (lm[:, None] * stride_dym + rn[None, :])
    w_ptrs = W + col0 * stride_wk + (rn[:, None] * stride_wn + lk[None, :] * stride_wk)
    for n0 in range(0, N, BLOCK_K):
        n_mask = n0 + rn < N
        dy = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = gemm._dot(dy, w, acc, DOT_FP32, PRECISION)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wn
    return acc


@triton.jit
def _group_dh_kernel(
    DH,
    DY0,
    DY1,
    DY2,
    DY3,
    W0,
    W1,
    W2,
    W3,
    N0,
    N1,
    N2,
    N3,
    stride_dy0m,
    stride_dy1m,
    stride_dy2m,
    stride_dy3m,
    stride_w0n,
    stride_w0k,
    stride_w1n,
    stride_w1k,
    stride_w2n,
    stride_w2k,
    stride_w3n,
    stride_w3k,
    M,
    K,
    WEIGHTS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """DH[M, K] (float32, contiguous) = Σ_{i < WEIGHTS} DY_i @ W_i (+ DH itself when
    ACCUMULATE): each program's K loop runs over every member's reduction (N_i columns of
    DY_i, unit column stride, row stride stride_dyim) into one register accumulator, and
    stores its tile once. Unused members' arguments are None / 0."""
    pid_m, pid_k = gemm._tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_k * BLOCK_N).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc = _dh_member(
        acc, DY0, W0, N0, stride_dy0m, stride_w0n, stride_w0k, row0, col0, M, K, DOT_FP32,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if WEIGHTS > 1:
        acc = _dh_member(
            acc, DY1, W1, N1, stride_dy1m, stride_w1n, stride_w1k, row0, col0, M, K, DOT_FP32,
            PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    if WEIGHTS > 2:
        acc = _dh_member(
            acc, DY2, W2, N2, stride_dy2m, stride_w2n, stride_w2k, row0, col0, M, K, DOT_FP32,
            PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    if WEIGHTS > 3:
        acc = _dh_member(
            acc, DY3, W3, N3, stride_dy3m, stride_w3n, stride_w3k, row0, col0, M, K, DOT_FP32,
            PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    gemm._epilogue(
        acc, DH, None, None, DH, None, row0, col0, M, K, K, K, 0, 1.0, 1.0, False, ACT_NONE, False,
        ACCUMULATE,
    )  # fmt: skip


@triton.jit
def _group_dweight_kernel(
    X,
    MEAN,
    RSTD,
    GAMMA,
    BETA,
    DZ0,
    DZ1,
    DZ2,
    DZ3,
    DW0,
    DW1,
    DW2,
    DW3,
    DB0,
    DB1,
    DB2,
    DB3,
    N0,
    N1,
    N2,
    N3,
    stride_dz0m,
    stride_dz1m,
    stride_dz2m,
    stride_dz3m,
    M,
    K,
    stride_xm,
    WEIGHTS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    WANT_DB0: tl.constexpr,
    WANT_DB1: tl.constexpr,
    WANT_DB2: tl.constexpr,
    WANT_DB3: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """DW_i[N_i, K] = DZ_i^T @ N(X) (and DB_i = Σ_rows DZ_i when WANT_DBi) for i < WEIGHTS: the
    programs cover member 0's tiles, then member 1's... (``gemm._dweight_tile`` each, column
    tiles fastest). Unused members' arguments are None / 0."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_N)
    end0 = num_k * tl.cdiv(N0, BLOCK_M)
    end1 = end0 + num_k * tl.cdiv(N1, BLOCK_M)
    end2 = end1 + num_k * tl.cdiv(N2, BLOCK_M)
    if pid < end0:
        gemm._dweight_tile(
            pid // num_k, pid % num_k, DZ0, X, DW0, DB0, MEAN, RSTD, GAMMA, BETA, M, N0, K,
            stride_dz0m, stride_xm, NORM, ACT_NONE, False, HAS_GAMMA, HAS_BETA, WANT_DB0,
            DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    if WEIGHTS > 1:
        if (pid >= end0) & (pid < end1):
            tile = pid - end0
            gemm._dweight_tile(
                tile // num_k, tile % num_k, DZ1, X, DW1, DB1, MEAN, RSTD, GAMMA, BETA, M, N1,
                K, stride_dz1m, stride_xm, NORM, ACT_NONE, False, HAS_GAMMA, HAS_BETA,
                WANT_DB1, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    if WEIGHTS > 2:
        if (pid >= end1) & (pid < end2):
            tile = pid - end1
            gemm._dweight_tile(
                tile // num_k, tile % num_k, DZ2, X, DW2, DB2, MEAN, RSTD, GAMMA, BETA, M, N2,
                K, stride_dz2m, stride_xm, NORM, ACT_NONE, False, HAS_GAMMA, HAS_BETA,
                WANT_DB2, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    if WEIGHTS > 3:
        if pid >= end2:
            tile = pid - end2
            gemm._dweight_tile(
                tile // num_k, tile % num_k, DZ3, X, DW3, DB3, MEAN, RSTD, GAMMA, BETA, M, N3,
                K, stride_dz3m, stride_xm, NORM, ACT_NONE, False, HAS_GAMMA, HAS_BETA,
                WANT_DB3, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip


def group_dh(dh, grad_outs, weights, accumulate):
    """dh = Σ_i grad_outs[i] @ weights[i] (+ dh when ``accumulate``) for up to MAX_WEIGHTS
    members, one launch; dh (rows, K) float32 contiguous, each grad_out (rows, N_i) with unit
    column stride (any row stride: a column slice of one gradient), the weights (N_i, K)
    any-strided."""
    rows, k = dh.shape
    count = len(weights)
    slots = {}
    for i in range(MAX_WEIGHTS):
        dy, w = (grad_outs[i], weights[i]) if i < count else (None, None)
        slots[f"DY{i}"], slots[f"W{i}"] = dy, w
        slots[f"N{i}"] = 0 if w is None else w.shape[0]
        slots[f"stride_dy{i}m"] = 0 if dy is None else dy.stride(0)
        slots[f"stride_w{i}n"] = 0 if w is None else w.stride(0)
        slots[f"stride_w{i}k"] = 0 if w is None else w.stride(1)
    dtype = weights[0].dtype
    aligned = gemm._aligned(dict(slots, DH=dh, K=k))
    flags = dict(WEIGHTS=count, ACCUMULATE=accumulate, **gemm.dot_flags(dtype))
    key = (configs.row_bucket(rows), k, tuple(w.shape[0] for w in weights), dtype, aligned)
    tiles = configs.gemm_tiles(dtype, rows, aligned)
    if configs.dot_kind(dtype) == "ieee" and configs.row_bucket(rows) is None:
        # exact fp32 FMA dots: with three or four members' loops the 8-warp tiles spill (Triton
        # 3.9, sm_80; tests/test_triton_compile.py), a 4-warp one does not
        tiles = [configs.gemm_tile(*GROUP_DH_IEEE_TILE, 4)]
    configs.launch(
        _group_dh_kernel,
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),),
        tiles,
        (*key, *flags.values()),
        DH=dh,
        M=rows,
        K=k,
        **slots,
        **flags,
        GROUP_M=8,
    )


def group_dweight(grad_outs, x, dweights, dbiases, norm, mean, rstd, gamma, beta):
    """dweights[i] = grad_outs[i]^T @ N(x) and, where dbiases[i] is not None, dbiases[i] =
    Σ_rows grad_outs[i], for up to MAX_WEIGHTS members, one launch; x (rows, K) and the
    grad_outs (rows, N_i) with unit column stride, dweights (N_i, K) and dbiases contiguous."""
    rows, k = x.shape
    count = len(dweights)
    slots = {}
    for i in range(MAX_WEIGHTS):
        dy, dw, db = (grad_outs[i], dweights[i], dbiases[i]) if i < count else (None,) * 3
        slots[f"DZ{i}"], slots[f"DW{i}"], slots[f"DB{i}"] = dy, dw, db
        slots[f"N{i}"] = 0 if dw is None else dw.shape[0]
        slots[f"stride_dz{i}m"] = 0 if dy is None else dy.stride(0)
    dtype = dweights[0].dtype
    aligned = gemm._aligned(dict(slots, X=x, K=k, stride_xm=x.stride(0)))
    widest = max(dw.shape[0] for dw in dweights)  # the tiles' row bucket, as gemm.dweight's N
    flags = dict(
        WEIGHTS=count,
        NORM=NORMS[norm],
        HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None,
        **{f"WANT_DB{i}": i < count and dbiases[i] is not None for i in range(MAX_WEIGHTS)},
        **gemm.dot_flags(dtype),
    )

    def grid(meta):
        num_k = triton.cdiv(k, meta["BLOCK_N"])
        return (sum(num_k * triton.cdiv(dw.shape[0], meta["BLOCK_M"]) for dw in dweights),)

    widths = tuple(dw.shape[0] for dw in dweights)
    sizes = (configs.row_bucket(widest), configs.row_bucket(rows), k, widths, dtype)
    configs.launch(
        _group_dweight_kernel,
        grid,
        configs.gemm_tiles(dtype, widest, aligned),
        (*sizes, aligned, *flags.values()),
        X=x,
        MEAN=mean,
        RSTD=rstd,
        GAMMA=gamma,
        BETA=beta,
        M=rows,
        K=k,
        stride_xm=x.stride(0),
        **slots,
        **flags,
    )


def _dbias(dy, n, dtype):
    """Σ_rows dy in a fixed order (row-block partials, then their column sum)."""
    rows = dy.shape[0]
    block_n = min(128, triton.next_power_of_2(n))
    tile = configs.Tile((("BLOCK_M", DZ_BLOCK_M), ("BLOCK_N", block_n)), DZ_WARPS)
    row_blocks = triton.cdiv(rows, DZ_BLOCK_M)
    partials = new_buffer((row_blocks, n), torch.float32, dy.device)
    configs.launch(
        _linear_epilogue_backward_kernel,
        lambda meta: (row_blocks, triton.cdiv(n, block_n)),
        [tile],
        (),
        DY=dy,
        PREACT=None,
        SEED=None,
        DZ=None,
        DBIAS_PART=partials,
        M=rows,
        N=n,
        stride_dym=dy.stride(0),
        stride_pm=0,
        threshold=0,
        dropout_scale=1.0,
        ACT=ACT_NONE,
        DROPOUT=False,
        WRITE_DZ=False,
        WANT_DBIAS=True,
    )
    return column_sum(partials, dtype)


def ln_linear_group_backward(
    grad_outs, x, ln_weight, ln_bias, weights, mean, rstd, norm, output_mask, quant="none"
):
    x, ln_weight, ln_bias = rowwise(x, ln_weight, ln_bias)
    grad_outs = rowwise(*grad_outs)
    online = quant == "bitnet_online"  # the checks refuse the offline modes' backward
    rows, k = x.shape
    n = len(weights)
    empty = x.new_empty((0,))
    want = [bool(m) for m in output_mask]
    want_dx = want[0]
    want_dgamma = want[1] and ln_weight is not None
    want_dbeta = want[2] and ln_bias is not None
    mean = mean if norm == "layer" else None
    rstd = rstd if norm != "none" else None
    # the members whose output has a gradient; the others' weight and bias gradients are zero
    given = [i for i, dy in enumerate(grad_outs) if dy is not None and rows > 0]
    dweights, dbiases = [empty] * n, [empty] * n
    for i, w in enumerate(weights):
        if want[3 + i] and i not in given:
            dweights[i] = w.new_zeros(w.shape)
        if want[3 + n + i] and i not in given:
            dbiases[i] = w.new_zeros((w.shape[0],))
    with_dweight = [i for i in given if want[3 + i]]
    if online and with_dweight:
        _, scale = _quant.row_stats(x, ln_weight, 0.0, norm, "none", k, rstd)  # once for all
        for i in with_dweight:
            dweights[i] = _quant.quant_dweight(
                grad_outs[i], x, ln_weight, weights[i], rstd, scale, norm, "none"
            )
    elif with_dweight:
        # one launch per MAX_WEIGHTS members, writing their bias sums too
        for i in with_dweight:
            w = weights[i]
            dweights[i] = new_buffer(w.shape, w.dtype, x.device)
            if want[3 + n + i]:
                dbiases[i] = new_buffer((w.shape[0],), w.dtype, x.device)
        for first in range(0, len(with_dweight), MAX_WEIGHTS):
            part = with_dweight[first : first + MAX_WEIGHTS]
            group_dweight(
                [grad_outs[i] for i in part], x, [dweights[i] for i in part],
                [dbiases[i] if want[3 + n + i] else None for i in part], norm, mean, rstd,
                ln_weight, ln_bias,
            )  # fmt: skip
    for i in given:  # the bias sums no dweight launch wrote
        if want[3 + n + i] and dbiases[i] is empty:
            dbiases[i] = _dbias(grad_outs[i], weights[i].shape[0], weights[i].dtype)
    dx = dgamma = dbeta = empty
    if want_dx or want_dgamma or want_dbeta:
        # dh = Σ_i dy_i @ W_i in float32 in one launch per MAX_WEIGHTS members, each summing
        # its members in registers (a later one adds the sum so far, its epilogue's residual)
        dh = new_buffer((rows, k), torch.float32, x.device)
        if not given:
            dh.zero_()
        for first in range(0, len(given), MAX_WEIGHTS):
            part = given[first : first + MAX_WEIGHTS]
            members = [_quant.fake_quant_weight(weights[i]) if online else weights[i]
                       for i in part]  # fmt: skip
            group_dh(dh, [grad_outs[i] for i in part], members, accumulate=first > 0)
        if norm == "none":
            dx = dh.to(x.dtype) if want_dx else empty
        elif rows == 0:
            dx = new_buffer(x.shape, x.dtype, x.device) if want_dx else empty
            dgamma = torch.zeros_like(ln_weight) if want_dgamma else empty
            dbeta = torch.zeros_like(ln_bias) if want_dbeta else empty
        else:
            dx, dgamma, dbeta = norm_backward(
                dh, x, ln_weight, ln_bias, mean, rstd, None, norm,
                [want_dx, want_dgamma, want_dbeta],
            )  # fmt: skip
    return dx, dgamma, dbeta, dweights, dbiases
