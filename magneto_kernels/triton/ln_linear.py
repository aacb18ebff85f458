"""The fused ``ln_linear`` op in Triton: ``alpha·residual + dropout(act(h @ weight^T + bias))``
with ``h = N(in_act(x))`` (the vocabulary is docs/design.md, Glossary).

Forward (two launches):
  1. a row-statistics pass (``norm.norm_forward`` with ``write_y=False``): mean and rstd of
     in_act(x) per row, float32, merged chunk-wise for wide rows (stable for |mean| >> std);
  2. one GEMM that *normalises on load*: every A tile is read from x, passed through the input
     activation, normalised in float32 registers ``(a - mean)·rstd·gamma + beta``, rounded to
     the weight dtype (that is h) and fed to ``tl.dot``; the epilogue (linear_epilogue) adds the
     bias, stores preact (only when an output activation is used), applies the activation,
     Philox dropout and ``alpha·residual``.
  h never touches memory. Numerically this is the unfused computation (h is rounded to the
  weight dtype exactly where the reference rounds it, the statistics are two-pass/Chan in fp32),
  so its limits are the reference's: for |mean|/std ≳ 1e3 fp32 loses ~|mean|/std·2^-24
  relative to the rounding of each row's mean, exactly like PyTorch's own fp32 LayerNorm
  (tested at 1e3: within 2x of PyTorch's error).
  Not kept: the "fold" variant (gamma folded into W, ``rstd·(x@W'^T - mean·ΣW') + W·beta + b`` in
  the epilogue). Its main loop is a plain GEMM on raw x, but the epilogue subtracts two numbers
  of size |mean|·‖W'‖, so its relative error grows as 2^-24·sqrt(K)·|mean|/std: ~4e-3 at
  |mean|/std = 1e3 and K = 4096, already past fp32's 1e-5 tolerance at |mean|/std ≈ 3.
  Cost of what we keep (from ptxas on sm_90a, no GPU measured yet): the A operand makes a
  register round trip (load → normalise → dot), so Triton cannot stream it through shared memory
  asynchronously; plain operands (no norm, no in_act, and the backward's dz) skip the round trip.
  If the GPU table shows the forward short of 1.10x matmul, the fold variant restricted to
  bf16/fp16 inputs without in_act is the next experiment.

Backward (``ln_linear_backward``):
  linear_epilogue_backward: dz = dy ⊙ keep/(1-p) ⊙ act'(preact) (mask regenerated from the
       seed), with per-row-block partial sums of dz for dbias (summed deterministically in a
       second stage);
  dweight = dz^T @ h   a GEMM that recomputes h on load from x and the saved mean/rstd, in
                       registers as the forward does: h never touches memory, which saves a
                       rows × in_features buffer and its write and read (the CPU backend
                       recomputes h in its norm-backward sweep, CUDA writes it for cuBLAS);
  dh = dz @ weight     (float32 result, kept exact for the norm backward);
  dx, dgamma, dbeta from the norm-backward row kernel, which also applies in_act'(x).

Gated input activations (``GATED``; IN_ACT is then the gate's activation): x = [gate | up] has
2K columns, x's row stride is no longer K, and every place that applies in_act to x (the row
statistics, the forward's normalise-on-load, the dweight GEMM's recompute of h, the norm
backward) loads both halves and forms a = act(gate)·up in float32, rounded to x's dtype; the
norm backward writes dx = [da·up·act'(gate) | da·act(gate)]. a is never stored: only x is.

float32 operands use ``tl.dot(input_precision=...)`` from ``common.fp32_dot_precision()``.
"""

import torch
import triton
import triton.language as tl

from magneto_kernels.codes import ACTIVATIONS, NORMS, dropout_threshold
from magneto_kernels.triton.activations import (
    ACT_NONE,
    activation,
    activation_grad,
    cast_rn,
    gated_activation,
    input_activation_args,
)
from magneto_kernels.triton.common import AUTOTUNE, INTERPRET, fp32_dot_precision, new_buffer
from magneto_kernels.triton.norm import (
    LAYER_NORM,
    NO_NORM,
    RMS_NORM,
    column_sum,
    norm_backward,
    norm_forward,
)
from magneto_kernels.triton.philox import dropout_keep

# One small configuration in the interpreter (autotuning there would take minutes).
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


def _gemm_configs():
    """Hopper tile shapes for bf16/fp16 (valid, if slower, for fp32).

    Few on purpose: every flag combination compiles every config while autotuning (5-30 s
    each), and the GPU check has minutes. Chosen from ptxas reports for sm_90a (AOT-compiled
    on a CPU-only machine, tests/test_triton_compile.py): 128x128 with 8 warps spills ~50 bytes
    for the normalise-on-load GEMM; 128x256 spills ~0.6 KB but may still win on large shapes.
    To be revisited with GPU measurements.
    """
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for bm, bn, bk, w, s in shapes
    ]


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
def _input_tile(x, x_ptrs, up_offset, valid, IN_ACT: tl.constexpr, GATED: tl.constexpr):
    """a = in_act(x) in float32 for the tile ``x`` loaded from ``x_ptrs`` with mask ``valid``;
    GATED: x is the gate, its up tile ``up_offset`` elements on."""
    x = x.to(tl.float32)
    if GATED:
        up = tl.load(x_ptrs + up_offset, mask=valid, other=0.0).to(tl.float32)
        a = gated_activation(x, up, IN_ACT, x_ptrs.dtype.element_ty)
    else:
        a = activation(x, IN_ACT)
    return a


@triton.jit
def _normalize_tile(
    a,
    mean,
    rstd,
    gamma,
    beta,
    valid,
    NORM: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
):
    """h = N(a) for a float32 tile a = in_act(x), before rounding; ``mean``/``rstd`` broadcast
    over the tile's rows, ``gamma``/``beta`` over its columns. Invalid (out-of-range) entries
    become 0."""
    h = a
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
    threshold,
    dropout_scale,
    alpha,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    WRITE_PREACT: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_RES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GATED: tl.constexpr = False,
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
    m_mask = pid_m * BLOCK_M + lm < M
    n_mask = pid_n * BLOCK_N + ln < N
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
        a = tl.load(a_ptrs, mask=valid, other=0.0)
        if NORM != NO_NORM or IN_ACT != ACT_NONE:
            gamma = tl.zeros([BLOCK_K], tl.float32)
            beta = tl.zeros([BLOCK_K], tl.float32)
            if HAS_GAMMA:
                gamma = tl.load(GAMMA + k, mask=k_mask, other=0.0).to(tl.float32)
            if HAS_BETA:
                beta = tl.load(BETA + k, mask=k_mask, other=0.0).to(tl.float32)
            h = _normalize_tile(
                _input_tile(a, a_ptrs, K * stride_ak, valid, IN_ACT, GATED),
                mean[:, None],
                rstd[:, None],
                gamma[None, :],
                beta[None, :],
                valid,
                NORM,
                HAS_GAMMA,
                HAS_BETA,
            )
            a = cast_rn(h, B.dtype.element_ty)
        # else: a plain GEMM operand (the backward's dz, or x with no norm and no in_act) goes
        # straight from memory to tl.dot, so the compiler can pipeline it through shared memory.
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_FP32, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # linear_epilogue: out = alpha·residual + dropout(act(preact)).
    c_mask = m_mask[:, None] & n_mask[None, :]
    tile = row0 * N + col0
    offs = lm[:, None] * N + ln[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + col0 + ln, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if WRITE_PREACT:
        tl.store(PREACT + tile + offs, cast_rn(acc, PREACT.dtype.element_ty), mask=c_mask)
    acc = activation(acc, ACT)
    if DROPOUT:
        # Element index in the (M, N) output: the Philox counter (64-bit).
        keep = dropout_keep(SEED, tile + offs.to(tl.int64), threshold)
        acc = tl.where(keep, acc * dropout_scale, 0.0)
    if HAS_RES:
        acc = alpha * tl.load(RES + tile + offs, mask=c_mask, other=0.0).to(tl.float32) + acc
    tl.store(C + tile + offs, cast_rn(acc, C.dtype.element_ty), mask=c_mask)


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
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GATED: tl.constexpr = False,
):
    """dweight[N, K] = dz^T @ h, reducing over the M rows; the h tiles are recomputed on load
    from x and the saved row statistics. (Here BLOCK_M tiles dweight's rows, i.e. N, and
    BLOCK_K tiles the reduction over M.) x is contiguous, K wide, or [gate | up] 2K wide when
    GATED. Absent MEAN, RSTD, GAMMA, BETA are None."""
    pid_n, pid_k = _tile_ids(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    n0 = (pid_n * BLOCK_M).to(tl.int64)
    k0 = (pid_k * BLOCK_N).to(tl.int64)
    ln = tl.arange(0, BLOCK_M)
    lk = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_K)
    n_mask = pid_n * BLOCK_M + ln < N
    k_mask = pid_k * BLOCK_N + lk < K
    gamma = tl.zeros([BLOCK_N], tl.float32)
    beta = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + k0 + lk, mask=k_mask, other=0.0).to(tl.float32)
    if HAS_BETA:
        beta = tl.load(BETA + k0 + lk, mask=k_mask, other=0.0).to(tl.float32)
    stride_xm = K  # x's row stride
    if GATED:
        stride_xm = 2 * K
    dz_ptrs = DZ + n0 + (rr[None, :] * N + ln[:, None])  # dz^T tile (BLOCK_M, BLOCK_K)
    x_ptrs = X + k0 + (rr[:, None] * stride_xm + lk[None, :])  # x tile (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m0 in range(0, M, BLOCK_K):
        rows = m0 + rr
        r_mask = rows < M
        dzt = tl.load(dz_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        valid = r_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
        mean = tl.zeros([BLOCK_K], tl.float32)
        rstd = tl.zeros([BLOCK_K], tl.float32)
        if NORM == LAYER_NORM:
            mean = tl.load(MEAN + rows, mask=r_mask, other=0.0)
        if NORM != NO_NORM:
            rstd = tl.load(RSTD + rows, mask=r_mask, other=0.0)
        h = _normalize_tile(
            _input_tile(x, x_ptrs, K, valid, IN_ACT, GATED),
            mean[:, None],
            rstd[:, None],
            gamma[None, :],
            beta[None, :],
            valid,
            NORM,
            HAS_GAMMA,
            HAS_BETA,
        )
        acc = _dot(dzt, cast_rn(h, DZ.dtype.element_ty), acc, DOT_FP32, PRECISION)
        dz_ptrs += BLOCK_K * N
        x_ptrs += BLOCK_K * stride_xm
    tl.store(
        DWEIGHT + n0 * K + k0 + (ln[:, None] * K + lk[None, :]),
        cast_rn(acc, DWEIGHT.dtype.element_ty),
        mask=n_mask[:, None] & k_mask[None, :],
    )


@triton.jit
def _linear_epilogue_backward_kernel(
    DY,
    PREACT,
    SEED,
    DZ,
    DBIAS_PART,
    M,
    N,
    threshold,
    dropout_scale,
    ACT: tl.constexpr,
    DROPOUT: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    WANT_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dz = dy ⊙ keep/(1-p) ⊙ act'(preact), and row-block partial sums of dz for dbias.
    PREACT (no activation), SEED (no dropout), DZ and DBIAS_PART (not wanted) may be None."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    mask = (rm < M)[:, None] & n_mask[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        dz = tl.where(dropout_keep(SEED, offs, threshold), dz * dropout_scale, 0.0)
    if ACT != ACT_NONE:
        preact = tl.load(PREACT + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dz * activation_grad(preact, ACT)
    if WRITE_DZ:
        tl.store(DZ + offs, cast_rn(dz, DZ.dtype.element_ty), mask=mask)
    if WANT_DBIAS:
        tl.store(DBIAS_PART + pid_m.to(tl.int64) * N + rn, tl.sum(dz, axis=0), mask=n_mask)


_TUNED = {}
"""Plain GEMM kernel -> its autotuner (GPU only: the interpreter runs ``_INTERPRET_META``)."""
if not INTERPRET:
    _TUNED[_ln_matmul_kernel] = triton.autotune(
        _gemm_configs(),
        key=["M", "N", "K", "NORM", "GATED", "ACT", "DROPOUT", "HAS_RES", "DOT_FP32", "PRECISION"],
    )(_ln_matmul_kernel)
    _TUNED[_dweight_kernel] = triton.autotune(
        _gemm_configs(), key=["M", "N", "K", "NORM", "GATED", "DOT_FP32", "PRECISION"]
    )(_dweight_kernel)


def _launch_gemm(kernel, rows, cols, **args):
    """Launch a GEMM kernel over a (rows × cols) output: autotuned on GPU, one config in the
    interpreter or when autotuning is off."""

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)

    if INTERPRET:
        kernel[grid(_INTERPRET_META)](**args, **_INTERPRET_META)
    elif not AUTOTUNE:
        config = _gemm_configs()[0]
        kernel[grid(config.kwargs)](
            **args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    else:
        _TUNED[kernel][grid](**args)


def _dot_flags(dtype: torch.dtype) -> dict:
    return {
        "DOT_FP32": INTERPRET and dtype != torch.float16,
        "PRECISION": fp32_dot_precision() if dtype == torch.float32 else "tf32",
    }


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, scale) of the dropout; (0, 1.0) without dropout."""
    if dropout_p == 0.0:
        return 0, 1.0
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _ln_matmul(
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
    views, out and the optional preact/residual contiguous (rows, cols); a is (rows, 2K),
    [gate | up], for a gated input activation. The keywords left at their defaults make it a
    plain GEMM, ``out = a @ b``."""
    rows = a.shape[0]
    k, cols = b.shape
    threshold, scale = _dropout_args(dropout_p)
    _launch_gemm(
        _ln_matmul_kernel,
        rows,
        cols,
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
        threshold=threshold,
        dropout_scale=scale,
        alpha=alpha,
        NORM=NORMS[norm],
        **input_activation_args(input_activation),
        HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        WRITE_PREACT=preact is not None,
        DROPOUT=dropout_p > 0.0,
        HAS_RES=residual is not None,
        **_dot_flags(b.dtype),
    )


def ln_linear(
    x,
    ln_weight,
    ln_bias,
    weight,
    bias,
    residual,
    seed,
    eps,
    norm,
    input_activation,
    activation,
    alpha,
    dropout_p,
):
    rows = x.shape[0]
    n = weight.shape[0]
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    if norm != "none":
        _, _, mean, rstd = norm_forward(
            x, None, None, eps, norm, input_activation=input_activation, write_y=False
        )
    else:
        mean = x.new_empty((0,), dtype=torch.float32)
        rstd = x.new_empty((0,), dtype=torch.float32)
    out = new_buffer((rows, n), x.dtype, x.device)
    write_preact = activation != "none"
    preact = new_buffer((rows, n) if write_preact else (0,), x.dtype, x.device)
    if rows == 0 or n == 0:
        return out, mean, rstd, preact
    _ln_matmul(
        x,
        weight.t(),
        out,
        norm=norm,
        input_activation=input_activation,
        mean=mean if norm == "layer" else None,
        rstd=rstd if norm != "none" else None,
        gamma=ln_weight,
        beta=ln_bias,
        bias=bias,
        activation=activation,
        preact=preact if write_preact else None,
        seed=seed if dropout_p > 0.0 else None,
        dropout_p=dropout_p,
        residual=residual,
        alpha=alpha,
    )
    return out, mean, rstd, preact


def ln_linear_backward(
    grad_out,
    x,
    ln_weight,
    ln_bias,
    weight,
    mean,
    rstd,
    preact,
    seed,
    norm,
    input_activation,
    activation,
    dropout_p,
    output_mask,
):
    # The kernels' gamma/beta are the op's ln_weight/ln_bias; grad_out is dy. x is (rows, 2k)
    # for a gated input activation.
    rows = x.shape[0]
    n, k = weight.shape
    empty = x.new_empty((0,))
    want_dx, want_dgamma, want_dbeta, want_dweight, want_dbias = (bool(m) for m in output_mask)
    want_dgamma = want_dgamma and ln_weight is not None
    want_dbeta = want_dbeta and ln_bias is not None
    need_dh = want_dx or want_dgamma or want_dbeta
    dweight = dbias = empty
    if rows == 0:
        zeros = torch.zeros_like
        return (
            new_buffer(x.shape, x.dtype, x.device) if want_dx else empty,
            zeros(ln_weight) if want_dgamma else empty,
            zeros(ln_bias) if want_dbeta else empty,
            zeros(weight) if want_dweight else empty,
            weight.new_zeros((n,)) if want_dbias else empty,
        )
    mean = mean if norm == "layer" else None
    rstd = rstd if norm != "none" else None

    # linear_epilogue_backward: dz (and dbias) ----------------------------------------------------
    threshold, scale = _dropout_args(dropout_p)
    transform = activation != "none" or dropout_p > 0.0
    dz = grad_out
    if transform or want_dbias:
        block_m, block_n = 32, min(128, triton.next_power_of_2(n))
        row_blocks = triton.cdiv(rows, block_m)
        if transform and (want_dweight or need_dh):
            dz = new_buffer((rows, n), weight.dtype, x.device)
        dbias_part = new_buffer((row_blocks, n), torch.float32, x.device) if want_dbias else None
        _linear_epilogue_backward_kernel[(row_blocks, triton.cdiv(n, block_n))](
            DY=grad_out,
            PREACT=preact if activation != "none" else None,
            SEED=seed if dropout_p > 0.0 else None,
            DZ=dz if dz is not grad_out else None,
            DBIAS_PART=dbias_part,
            M=rows,
            N=n,
            threshold=threshold,
            dropout_scale=scale,
            ACT=ACTIVATIONS[activation],
            DROPOUT=dropout_p > 0.0,
            WRITE_DZ=dz is not grad_out,
            WANT_DBIAS=want_dbias,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=4,
        )
        if want_dbias:
            dbias = column_sum(dbias_part, weight.dtype)
    if dz.dtype != weight.dtype:
        dz = dz.to(weight.dtype)

    # dweight = dz^T @ h, h recomputed on load ---------------------------------------------------
    if want_dweight:
        dweight = new_buffer(weight.shape, weight.dtype, x.device)
        _launch_gemm(
            _dweight_kernel,
            n,
            k,
            DZ=dz,
            X=x,
            DWEIGHT=dweight,
            MEAN=mean,
            RSTD=rstd,
            GAMMA=ln_weight,
            BETA=ln_bias,
            M=rows,
            N=n,
            K=k,
            NORM=NORMS[norm],
            **input_activation_args(input_activation),
            HAS_GAMMA=ln_weight is not None,
            HAS_BETA=ln_bias is not None,
            **_dot_flags(weight.dtype),
        )

    # dh = dz @ weight, then the norm backward (with in_act') -----------------------------------
    dx = dgamma = dbeta = empty
    if need_dh:
        dh = new_buffer((rows, k), torch.float32, x.device)
        _ln_matmul(dz, weight, dh)
        dx, dgamma, dbeta = norm_backward(
            dh,
            x,
            ln_weight,
            ln_bias,
            mean,
            rstd,
            None,
            norm,
            [want_dx, want_dgamma, want_dbeta],
            input_activation=input_activation,
        )
    return dx, dgamma, dbeta, dweight, dbias
