"""The normalise-on-load GEMM kernels of ``ln_linear`` and their launcher (the vocabulary is
docs/design.md, Glossary).

``_ln_matmul_kernel``: ``C = linear_epilogue(N(in_act(A)) @ B)``. Every A tile is read from x,
put through the input activation, normalised in float32 registers ``(a - mean)·rstd·gamma +
beta``, rounded to the weight dtype (that is h) and fed to ``tl.dot``; the epilogue adds the
bias, stores preact (with an output activation), applies the activation, Philox dropout and
``alpha·residual``, in column slices of the tile (``_epilogue``). h never touches memory, and it
is rounded where the reference rounds it. With no norm and no input activation it is a plain
GEMM (the backward's ``dh = dz @ weight``), whose A operand the compiler pipelines through
shared memory.

``_dweight_kernel``: ``dweight = dz^T @ h``, recomputing the h tiles on load from x and the saved
statistics as the forward does.

Gated input activations (``GATED``; IN_ACT is then the gate's activation): x = [gate | up] has
2K columns; both halves are loaded and a = act(gate)·up is formed on load.

Tiles come from ``configs.gemm_tiles`` (per dot kind and row bucket; docs/design.md, Fitting the
GPU). A, B, x, dz and the residual are read with their strides; outputs are written contiguous.
"""

import re

import torch
import triton
import triton.language as tl

from magneto_kernels.codes import ACTIVATIONS, NORMS, dropout_threshold
from magneto_kernels.triton import configs
from magneto_kernels.triton.activations import (
    ACT_NONE,
    activation,
    cast_rn,
    input_activation,
    input_activation_args,
)
from magneto_kernels.triton.common import INTERPRET, fp32_dot_precision
from magneto_kernels.triton.norm import LAYER_NORM, NO_NORM, RMS_NORM
from magneto_kernels.triton.philox import dropout_keep

EPILOGUE_SLICE: tl.constexpr = tl.constexpr(4096)
"""The epilogue runs on column slices of the accumulator of at most this many elements: its
dropout holds four Philox words per element at once, which a whole 128x128 tile's elements do
not fit in registers (docs/design.md, Fitting the GPU)."""


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles sweep the columns together so A and B tiles are
    reused from L2 before eviction."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _normalized_tile(
    x_ptrs,
    up_offset,
    valid,
    mean,
    rstd,
    gamma,
    beta,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
):
    """h = N(in_act(x)) in float32 for the x tile at ``x_ptrs`` (mask ``valid``; GATED: x is the
    gate, its up tile ``up_offset`` elements on), before rounding. ``mean``/``rstd`` broadcast
    over the tile's rows, ``gamma``/``beta`` over its columns; out-of-range entries become 0."""
    x = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
    up = x  # the up half, when GATED
    if GATED:
        up = tl.load(x_ptrs + up_offset, mask=valid, other=0.0).to(tl.float32)
    h = input_activation(x, up, IN_ACT, GATED, x_ptrs.dtype.element_ty)
    if NORM == LAYER_NORM:
        h = (h - mean) * rstd
    elif NORM == RMS_NORM:
        h = h * rstd
    if HAS_GAMMA:
        h = h * gamma
    if HAS_BETA:
        h = h + beta
    return tl.where(valid, h, 0.0)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # ``a`` and ``b`` have the same dtype. DOT_FP32 (interpreter, bf16) widens both operands
    # so the interpreter never does bf16 arithmetic; the products are the same.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _epilogue(
    acc,
    C,
    PREACT,
    BIAS,
    RES,
    SEED,
    row0,
    col0,
    M,
    N,
    stride_cm,
    stride_rm,
    threshold,
    dropout_scale,
    alpha,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_RES: tl.constexpr,
    C_STRIDED: tl.constexpr = False,
):
    """linear_epilogue of the accumulator tile ``acc`` whose element (0, 0) is output element
    (row0, col0): C = alpha·residual + dropout(act(preact)), preact = acc + bias (stored with
    an output activation). PREACT is contiguous (M, N); C has row stride stride_cm with C_STRIDED
    (a column range of a wider output: ln_linear_group's concat), else N; RES stride_rm.
    A tile larger than EPILOGUE_SLICE is halved along its columns and each half done in turn."""
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    if BM * BN > EPILOGUE_SLICE:
        left, right = acc.reshape(BM, 2, BN // 2).permute(0, 2, 1).split()
        _epilogue(
            left, C, PREACT, BIAS, RES, SEED, row0, col0, M, N, stride_cm, stride_rm, threshold,
            dropout_scale, alpha, HAS_BIAS, ACT, DROPOUT, HAS_RES, C_STRIDED,
        )  # fmt: skip
        _epilogue(
            right, C, PREACT, BIAS, RES, SEED, row0, col0 + BN // 2, M, N, stride_cm, stride_rm,
            threshold, dropout_scale, alpha, HAS_BIAS, ACT, DROPOUT, HAS_RES, C_STRIDED,
        )  # fmt: skip
    else:
        lm = tl.arange(0, BM)
        ln = tl.arange(0, BN)
        n_mask = col0 + ln < N
        c_mask = (row0 + lm < M)[:, None] & n_mask[None, :]
        tile = row0 * N + col0  # 64-bit tile origin, 32-bit offsets inside the tile
        offs = lm[:, None] * N + ln[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + col0 + ln, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if ACT != ACT_NONE:
            tl.store(PREACT + tile + offs, cast_rn(acc, PREACT.dtype.element_ty), mask=c_mask)
            acc = activation(acc, ACT)
        if DROPOUT:
            # The element's index in the (M, N) output is its Philox counter (64-bit).
            keep = dropout_keep(SEED, tile + offs.to(tl.int64), threshold)
            acc = tl.where(keep, acc * dropout_scale, 0.0)
        if HAS_RES:
            res_offs = row0 * stride_rm + col0 + (lm[:, None] * stride_rm + ln[None, :])
            acc = alpha * tl.load(RES + res_offs, mask=c_mask, other=0.0).to(tl.float32) + acc
        if C_STRIDED:
            c_offs = row0 * stride_cm + col0 + (lm[:, None] * stride_cm + ln[None, :])
            tl.store(C + c_offs, cast_rn(acc, C.dtype.element_ty), mask=c_mask)
        else:  # contiguous C: the offsets above (a runtime stride costs registers: sm_80 spills)
            tl.store(C + tile + offs, cast_rn(acc, C.dtype.element_ty), mask=c_mask)


@triton.jit
def _ln_matmul_kernel(
    A,
    B,
    C,
    PREACT,
    MEAN,
    RSTD,
    GAMMA,
    BETA,
    BIAS,
    RES,
    SEED,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_rm,
    threshold,
    dropout_scale,
    alpha,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_RES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = linear_epilogue(N(in_act(A)) @ B), B[k, n] at B + k·stride_bk + n·stride_bn.

    Forward: A = x, B = weight^T. Also the backward's dh = dz @ weight (no norm, no epilogue).
    GATED: A = [gate | up], the up half K columns (K·stride_ak) on from the gate.
    Absent tensors (PREACT, MEAN, RSTD, GAMMA, BETA, BIAS, RES, SEED) are None.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # 64-bit tile origins, 32-bit offsets inside the tile: keeps the pointer tensors small.
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = row0 + lm < M
    n_mask = col0 + ln < N
    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM == LAYER_NORM:
        mean = tl.load(MEAN + row0 + lm, mask=m_mask, other=0.0)
    if NORM != NO_NORM:
        rstd = tl.load(RSTD + row0 + lm, mask=m_mask, other=0.0)
    a_ptrs = A + row0 * stride_am + (lm[:, None] * stride_am + rk[None, :] * stride_ak)
    b_ptrs = B + col0 * stride_bn + (rk[:, None] * stride_bk + ln[None, :] * stride_bn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        valid = m_mask[:, None] & k_mask[None, :]
        if NORM != NO_NORM or IN_ACT != ACT_NONE:
            gamma = tl.zeros([BLOCK_K], tl.float32)
            beta = tl.zeros([BLOCK_K], tl.float32)
            if HAS_GAMMA:
                gamma = tl.load(GAMMA + k, mask=k_mask, other=0.0).to(tl.float32)
            if HAS_BETA:
                beta = tl.load(BETA + k, mask=k_mask, other=0.0).to(tl.float32)
            h = _normalized_tile(
                a_ptrs,
                K * stride_ak,
                valid,
                mean[:, None],
                rstd[:, None],
                gamma[None, :],
                beta[None, :],
                NORM,
                IN_ACT,
                GATED,
                HAS_GAMMA,
                HAS_BETA,
            )
            a = cast_rn(h, B.dtype.element_ty)
        else:
            # A plain GEMM operand (the backward's dz, or x with no norm and no in_act) goes
            # straight from memory to tl.dot, so the compiler can pipeline it through shared
            # memory.
            a = tl.load(a_ptrs, mask=valid, other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_FP32, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _epilogue(
        acc, C, PREACT, BIAS, RES, SEED, row0, col0, M, N, N, stride_rm, threshold,
        dropout_scale, alpha, HAS_BIAS, ACT, DROPOUT, HAS_RES,
    )  # fmt: skip


@triton.jit
def _dweight_tile(
    pid_n,
    pid_k,
    DZ,
    X,
    DWEIGHT,
    DBIAS,
    MEAN,
    RSTD,
    GAMMA,
    BETA,
    M,
    N,
    K,
    stride_dzm,
    stride_xm,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    WANT_DBIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile (pid_n, pid_k) of dweight[N, K] = dz^T @ h (see ``_dweight_kernel``). WANT_DBIAS:
    the programs of the first column tile (pid_k == 0) also write dbias[n] = Σ_rows dz[:, n]
    from the dz tiles they load anyway, row block after row block (a fixed order)."""
    n0 = (pid_n * BLOCK_M).to(tl.int64)
    k0 = (pid_k * BLOCK_N).to(tl.int64)
    ln = tl.arange(0, BLOCK_M)
    lk = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_K)
    n_mask = n0 + ln < N
    k_mask = k0 + lk < K
    gamma = tl.zeros([BLOCK_N], tl.float32)
    beta = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + k0 + lk, mask=k_mask, other=0.0).to(tl.float32)
    if HAS_BETA:
        beta = tl.load(BETA + k0 + lk, mask=k_mask, other=0.0).to(tl.float32)
    dz_ptrs = DZ + n0 + (rr[None, :] * stride_dzm + ln[:, None])  # dz^T tile (BLOCK_M, BLOCK_K)
    x_ptrs = X + k0 + (rr[:, None] * stride_xm + lk[None, :])  # x tile (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dbias = tl.zeros([BLOCK_M], tl.float32)
    for m0 in range(0, M, BLOCK_K):
        rows = m0 + rr
        r_mask = rows < M
        dzt = tl.load(dz_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if WANT_DBIAS:
            if pid_k == 0:
                dbias += tl.sum(dzt.to(tl.float32), axis=1)
        mean = tl.zeros([BLOCK_K], tl.float32)
        rstd = tl.zeros([BLOCK_K], tl.float32)
        if NORM == LAYER_NORM:
            mean = tl.load(MEAN + rows, mask=r_mask, other=0.0)
        if NORM != NO_NORM:
            rstd = tl.load(RSTD + rows, mask=r_mask, other=0.0)
        h = _normalized_tile(
            x_ptrs,
            K,
            r_mask[:, None] & k_mask[None, :],
            mean[:, None],
            rstd[:, None],
            gamma[None, :],
            beta[None, :],
            NORM,
            IN_ACT,
            GATED,
            HAS_GAMMA,
            HAS_BETA,
        )
        acc = _dot(dzt, cast_rn(h, DZ.dtype.element_ty), acc, DOT_FP32, PRECISION)
        dz_ptrs += BLOCK_K * stride_dzm
        x_ptrs += BLOCK_K * stride_xm
    tl.store(
        DWEIGHT + n0 * K + k0 + (ln[:, None] * K + lk[None, :]),
        cast_rn(acc, DWEIGHT.dtype.element_ty),
        mask=n_mask[:, None] & k_mask[None, :],
    )
    if WANT_DBIAS:
        if pid_k == 0:
            tl.store(DBIAS + n0 + ln, cast_rn(dbias, DBIAS.dtype.element_ty), mask=n_mask)


@triton.jit
def _dweight_kernel(
    DZ,
    X,
    DWEIGHT,
    MEAN,
    RSTD,
    GAMMA,
    BETA,
    M,
    N,
    K,
    stride_dzm,
    stride_xm,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dweight[N, K] = dz^T @ h, reducing over the M rows; the h tiles are recomputed on load
    from x and the saved row statistics. (Here BLOCK_M tiles dweight's rows, i.e. N, and
    BLOCK_K tiles the reduction over M.) dz and x have row strides stride_dzm, stride_xm; x is
    [gate | up] when GATED. Absent MEAN, RSTD, GAMMA, BETA are None."""
    pid_n, pid_k = _tile_ids(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    _dweight_tile(
        pid_n, pid_k, DZ, X, DWEIGHT, None, MEAN, RSTD, GAMMA, BETA, M, N, K, stride_dzm,
        stride_xm, NORM, IN_ACT, GATED, HAS_GAMMA, HAS_BETA, False, DOT_FP32, PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


def _aligned(args: dict) -> bool:
    """Whether Triton specialises the launch as aligned: every tensor 16-byte aligned, every
    width (N, K; a group's N0, N1...) and stride a multiple of 16 (or 1)."""
    return all(
        v.data_ptr() % 16 == 0 if isinstance(v, torch.Tensor) else v % 16 == 0 or v == 1
        for name, v in args.items()
        if isinstance(v, torch.Tensor) or re.fullmatch(r"[NK]\d?|stride_.*", name)
    )


def dot_flags(dtype) -> dict:
    """The DOT_FP32 and PRECISION flags of ``_dot`` for ``dtype`` operands."""
    return dict(
        DOT_FP32=INTERPRET and dtype != torch.float16,
        PRECISION=fp32_dot_precision() if dtype == torch.float32 else "tf32",
    )


def _gemm(kernel, rows, cols, dtype, flags, gated_side, **args):
    """Launch a GEMM kernel over a (rows × cols) output with the tiles of its operands' ``dtype``
    and row count; ``flags`` are its constexpr flags (part of the autotuning key), and with a
    gated input activation its ``gated_side`` operand ("a" or "b") loads two tiles a stage."""

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)

    dot = dot_flags(dtype)
    aligned = _aligned(args)
    gated = {f"{gated_side}_tiles": 2} if flags["GATED"] else {}
    tiles = configs.gemm_tiles(dtype, rows, aligned, **gated)
    sizes = (configs.row_bucket(args["M"]), args["N"], args["K"], dtype, aligned)
    key = (*sizes, *flags.values(), *dot.values())
    configs.launch(kernel, grid, tiles, key, **args, **flags, **dot, GROUP_M=8)


def dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, scale) of the dropout; (0, 1.0) without dropout."""
    if dropout_p == 0.0:
        return 0, 1.0
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def ln_matmul(
    a,
    b,
    out,
    *,
    norm="none",
    input_activation="none",
    mean=None,
    rstd=None,
    gamma=None,
    beta=None,
    bias=None,
    activation="none",
    preact=None,
    seed=None,
    dropout_p=0.0,
    residual=None,
    alpha=1.0,
):
    """out = linear_epilogue(N(in_act(a)) @ b) for a (rows, K) and b (K, cols), both any-strided
    views, out and the optional preact contiguous (rows, cols), residual (rows, cols) with unit
    column stride; a is (rows, 2K), [gate | up], for a gated input activation. The keywords left
    at their defaults make it a plain GEMM, ``out = a @ b``."""
    rows = a.shape[0]
    k, cols = b.shape
    threshold, scale = dropout_args(dropout_p)
    flags = dict(
        NORM=NORMS[norm],
        **input_activation_args(input_activation),
        HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        DROPOUT=dropout_p > 0.0,
        HAS_RES=residual is not None,
    )
    _gemm(
        _ln_matmul_kernel,
        rows,
        cols,
        b.dtype,
        flags,
        "a",
        A=a,
        B=b,
        C=out,
        PREACT=preact,
        MEAN=mean,
        RSTD=rstd,
        GAMMA=gamma,
        BETA=beta,
        BIAS=bias,
        RES=residual,
        SEED=seed,
        M=rows,
        N=cols,
        K=k,
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_bk=b.stride(0),
        stride_bn=b.stride(1),
        stride_rm=0 if residual is None else residual.stride(0),
        threshold=threshold,
        dropout_scale=scale,
        alpha=alpha,
    )


def dweight(dz, x, out, norm, input_activation, *, mean=None, rstd=None, gamma=None, beta=None):
    """out = dz^T @ h, h = N(in_act(x)) recomputed on load (``_dweight_kernel``), for dz
    (rows, N) and x (rows, K), or (rows, 2K) [gate | up] for a gated input activation, both with
    unit column stride; out (N, K) contiguous."""
    rows = x.shape[0]
    n, k = out.shape
    flags = dict(
        NORM=NORMS[norm],
        **input_activation_args(input_activation),
        HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None,
    )
    _gemm(
        _dweight_kernel,
        n,
        k,
        out.dtype,
        flags,
        "b",
        DZ=dz,
        X=x,
        DWEIGHT=out,
        MEAN=mean,
        RSTD=rstd,
        GAMMA=gamma,
        BETA=beta,
        M=rows,
        N=n,
        K=k,
        stride_dzm=dz.stride(0),
        stride_xm=x.stride(0),
    )
