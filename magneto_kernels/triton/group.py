"""``ln_linear_group`` in Triton: ``out_i = N(x) @ W_i^T + b_i`` for up to ``MAX_WEIGHTS``
weights of one normalised input (q/k/v, gate/up).

Forward, two launches whatever the number of weights:
  1. the row statistics (``norm.norm_forward`` with ``write_y=False``), once for the group;
  2. one GEMM launch whose programs cover every weight's output tiles (``_group_kernel``): the
     weights are separate pointer arguments (no weight is copied), and each program finds its
     weight from its program id, then runs ``ln_linear``'s normalise-on-load tile
     (``gemm._normalized_tile``, ``gemm._epilogue``) on it. As in ``ln_linear``, h never
     touches memory: each program normalises the A tiles it reads.
Backward: ``group_backward.py``.
Quantised (``quant``, BitNet's; ``triton/quant.py``): the row statistics and activation scales
once (``quant.row_stats``), then one ``quant.project`` launch per weight, each forming the row's
codes on load from them.
"""

import torch
import triton
import triton.language as tl

from magneto_kernels.codes import NORMS
from magneto_kernels.triton import configs, gemm
from magneto_kernels.triton import quant as _quant
from magneto_kernels.triton.activations import ACT_NONE, cast_rn
from magneto_kernels.triton.common import new_buffer, rowwise
from magneto_kernels.triton.norm import LAYER_NORM, NO_NORM, norm_forward

MAX_WEIGHTS = 4
"""The weights one launch takes (q/k/v and gate/up need 3 and 2); a longer list runs in groups
of this many, each one launch."""
GROUP_IEEE_TILE = (32, 64, 16, 8, 2)
"""(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the exact-fp32 group launch above 16 rows."""


@triton.jit
def _weight_tile(
    tile,
    A,
    B,
    C,
    BIAS,
    mean,
    rstd,
    GAMMA,
    BETA,
    M,
    N,
    K,
    stride_am,
    stride_bk,
    stride_bn,
    stride_cm,
    NORM: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Output tile ``tile`` (row-tile major over this weight's tiles) of C = N(A) @ B + bias, C
    with row stride stride_cm."""
    num_m = tl.cdiv(M, BLOCK_M)
    row0 = ((tile % num_m) * BLOCK_M).to(tl.int64)
    col0 = ((tile // num_m) * BLOCK_N).to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = row0 + lm < M
    n_mask = col0 + ln < N
    a_ptrs = A + row0 * stride_am + (lm[:, None] * stride_am + rk[None, :])
    b_ptrs = B + col0 * stride_bn + (rk[:, None] * stride_bk + ln[None, :] * stride_bn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        valid = m_mask[:, None] & k_mask[None, :]
        if NORM != NO_NORM:
            gamma = tl.zeros([BLOCK_K], tl.float32)
            beta = tl.zeros([BLOCK_K], tl.float32)
            if HAS_GAMMA:
                gamma = tl.load(GAMMA + k, mask=k_mask, other=0.0).to(tl.float32)
            if HAS_BETA:
                beta = tl.load(BETA + k, mask=k_mask, other=0.0).to(tl.float32)
            h = gemm._normalized_tile(
                a_ptrs, 0, valid, mean[:, None], rstd[:, None], gamma[None, :], beta[None, :],
                NORM, ACT_NONE, False, HAS_GAMMA, HAS_BETA,
            )  # fmt: skip
            a = cast_rn(h, B.dtype.element_ty)
        else:
            a = tl.load(a_ptrs, mask=valid, other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = gemm._dot(a, b, acc, DOT_FP32, PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    gemm._epilogue(
        acc, C, None, BIAS, None, None, row0, col0, M, N, stride_cm, 0, 0, 1.0, 1.0,
        HAS_BIAS, ACT_NONE, False, False, True,
    )  # fmt: skip


@triton.jit
def _group_kernel(
    A,
    MEAN,
    RSTD,
    GAMMA,
    BETA,
    B0,
    B1,
    B2,
    B3,
    C0,
    C1,
    C2,
    C3,
    BIAS0,
    BIAS1,
    BIAS2,
    BIAS3,
    N0,
    N1,
    N2,
    N3,
    stride_b0k,
    stride_b0n,
    stride_b1k,
    stride_b1n,
    stride_b2k,
    stride_b2n,
    stride_b3k,
    stride_b3n,
    stride_cm,
    M,
    K,
    stride_am,
    WEIGHTS: tl.constexpr,
    CONCAT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_BIAS0: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    HAS_BIAS3: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C_i[M, N_i] = N(A) @ B_i + BIAS_i for i < WEIGHTS, B_i[k, n] at B_i + k·stride_bik +
    n·stride_bin (weight i transposed), C_i with row stride N_i, or with CONCAT stride_cm (the
    width of the one output whose columns C_i are): the programs cover weight 0's tiles, then
    weight 1's...
    The row statistics are loaded once per program. Unused weights' arguments are None / 0."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    lm = tl.arange(0, BLOCK_M)
    # This program's row tile is needed before its weight is known only for the statistics:
    # every weight's tiles are row-tile major, so tile % num_m is the row tile in each.
    end0 = num_m * tl.cdiv(N0, BLOCK_N)
    end1 = end0 + num_m * tl.cdiv(N1, BLOCK_N)
    end2 = end1 + num_m * tl.cdiv(N2, BLOCK_N)
    start = tl.where(pid < end0, 0, tl.where(pid < end1, end0, tl.where(pid < end2, end1, end2)))
    rows = ((pid - start) % num_m).to(tl.int64) * BLOCK_M + lm
    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM == LAYER_NORM:
        mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
    if NORM != NO_NORM:
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    if pid < end0:
        _weight_tile(
            pid, A, B0, C0, BIAS0, mean, rstd, GAMMA, BETA, M, N0, K, stride_am, stride_b0k,
            stride_b0n, stride_cm if CONCAT else N0, NORM,
            HAS_GAMMA, HAS_BETA, HAS_BIAS0, DOT_FP32, PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    if WEIGHTS > 1:
        if (pid >= end0) & (pid < end1):
            _weight_tile(
                pid - end0, A, B1, C1, BIAS1, mean, rstd, GAMMA, BETA, M, N1, K, stride_am,
                stride_b1k, stride_b1n, stride_cm if CONCAT else N1, NORM,
                HAS_GAMMA, HAS_BETA, HAS_BIAS1, DOT_FP32,
                PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    if WEIGHTS > 2:
        if (pid >= end1) & (pid < end2):
            _weight_tile(
                pid - end1, A, B2, C2, BIAS2, mean, rstd, GAMMA, BETA, M, N2, K, stride_am,
                stride_b2k, stride_b2n, stride_cm if CONCAT else N2, NORM,
                HAS_GAMMA, HAS_BETA, HAS_BIAS2, DOT_FP32,
                PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    if WEIGHTS > 3:
        if pid >= end2:
            _weight_tile(
                pid - end2, A, B3, C3, BIAS3, mean, rstd, GAMMA, BETA, M, N3, K, stride_am,
                stride_b3k, stride_b3n, stride_cm if CONCAT else N3, NORM,
                HAS_GAMMA, HAS_BETA, HAS_BIAS3, DOT_FP32,
                PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip


def group_matmul(x, weights, biases, outs, norm, mean, rstd, gamma, beta):
    """outs[i] = N(x) @ weights[i]^T + biases[i] for up to MAX_WEIGHTS weights, one launch; x
    (rows, K) with unit column stride, the weights (N_i, K) any-strided, outs with unit column
    stride (column ranges of one concat output, or contiguous)."""
    rows, k = x.shape
    count = len(weights)
    slots = {}
    for i in range(MAX_WEIGHTS):
        w = weights[i] if i < count else None
        slots[f"B{i}"] = None if w is None else w.t()
        slots[f"C{i}"] = outs[i] if i < count else None
        slots[f"BIAS{i}"] = biases[i] if i < count else None
        slots[f"N{i}"] = 0 if w is None else w.shape[0]
        slots[f"stride_b{i}k"] = 0 if w is None else w.stride(1)
        slots[f"stride_b{i}n"] = 0 if w is None else w.stride(0)
        slots[f"HAS_BIAS{i}"] = i < count and biases[i] is not None
    # concat: the outputs are column ranges of one tensor, of one row stride
    concat = any(o.stride(0) != o.shape[1] for o in outs)
    dtype = weights[0].dtype
    aligned = (
        x.stride(0) % 16 == 0
        and k % 16 == 0
        and all(w.stride(0) % 16 == 0 for w in weights)
        and all(o.is_contiguous() or o.stride(0) % 16 == o.data_ptr() % 16 == 0 for o in outs)
    )
    tiles = configs.gemm_tiles(dtype, rows, aligned)
    if configs.dot_kind(dtype) == "ieee" and configs.row_bucket(rows) != 16:
        # exact fp32 FMA dots: ln_linear's tiles spill here (the weight slots' code and the
        # normalise-on-load A tile), a shorter row tile does not (tests/test_triton_compile.py)
        tiles = [configs.gemm_tile(*GROUP_IEEE_TILE, 4)]

    def grid(meta):
        num_m = triton.cdiv(rows, meta["BLOCK_M"])
        return (sum(num_m * triton.cdiv(w.shape[0], meta["BLOCK_N"]) for w in weights),)

    flags = dict(
        WEIGHTS=count,
        CONCAT=concat,
        NORM=NORMS[norm],
        HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None,
        **gemm.dot_flags(dtype),
    )
    key = (
        configs.row_bucket(rows),
        k,
        tuple(w.shape[0] for w in weights),
        dtype,
        aligned,
        *flags.values(),
        *(slots[f"HAS_BIAS{i}"] for i in range(MAX_WEIGHTS)),
    )
    configs.launch(
        _group_kernel,
        grid,
        tiles,
        key,
        A=x,
        MEAN=mean,
        RSTD=rstd,
        GAMMA=gamma,
        BETA=beta,
        M=rows,
        K=k,
        stride_am=x.stride(0),
        stride_cm=outs[0].stride(0),
        **slots,
        **flags,
    )


def _outputs(rows, weights, x, concat):
    """The op's outputs (one per weight, or the one concat output) and each projection's
    destination (with concat, its column range of the one output)."""
    widths = [w.shape[0] for w in weights]
    if not concat:
        outs = [new_buffer((rows, n), x.dtype, x.device) for n in widths]
        return outs, outs
    out = new_buffer((rows, sum(widths)), x.dtype, x.device)
    return [out], list(out.split(widths, dim=1))


def ln_linear_group(
    x, ln_weight, ln_bias, weights, biases, eps, norm, quant="none", weight_scales=None,
    concat=False,
):  # fmt: skip
    rows = x.shape[0]
    x, ln_weight, ln_bias = rowwise(x, ln_weight, ln_bias)
    outs, dests = _outputs(rows, weights, x, concat)
    if quant != "none":
        rstd, scale = _quant.row_stats(x, ln_weight, eps, norm, "none", x.shape[1])
        for i, (w, b) in enumerate(zip(weights, biases)):
            ws = None if weight_scales is None else weight_scales[i : i + 1]
            args = (x, ln_weight, w, b, None, norm, "none", 1.0, quant, ws, rstd, scale)
            _quant.project(*args, out=dests[i])
        return outs, x.new_empty((0,), dtype=torch.float32), rstd
    if norm != "none":
        _, _, mean, rstd = norm_forward(x, None, None, eps, norm, write_y=False)
    else:
        mean = rstd = x.new_empty((0,), dtype=torch.float32)
    if rows == 0:
        return outs, mean, rstd
    for first in range(0, len(weights), MAX_WEIGHTS):
        part = slice(first, first + MAX_WEIGHTS)
        group_matmul(
            x,
            weights[part],
            biases[part],
            dests[part],
            norm,
            mean if norm == "layer" else None,
            rstd if norm != "none" else None,
            ln_weight,
            ln_bias,
        )
    return outs, mean, rstd
