"""BitNet b1.58's quantised ``ln_linear`` in Triton (``quant=``; the specification, step by step
and dtype by dtype, is ``magneto_kernels/quant.py``). h = BitNetRMSNorm(in_act(x)) is never
written out: every kernel that needs it recomputes it on load from x and the row statistics.

Forward, every mode:
  1. ``_row_stats_kernel``: per row, rstd of a = in_act(x) (RMSNorm) and the activation scale
     s = 127 / max|h| (a second sweep of the row, h needing rstd first);
  2. ``_quant_matmul_kernel``: its prologue forms h, then
     - offline (``bitnet_offline``, ``bitlinear``): the int8 codes q = round(h·s), against the
       packed 2-bit weight tile unpacked to int8 in registers, ``tl.dot`` int8 × int8 → int32;
       the epilogue applies 1/s and ``weight_scale`` as each class does (AutoBitLinear
       multiplies after the bias, BitLinear divides before it);
     - online (``bitnet_online``): h fake-quantised (q/s in x's dtype) against the fake-quantised
       weight, a float dot; the epilogue adds the bias;
     then ``alpha·residual`` (``gemm._epilogue``).
  The online weight is fake-quantised into a copy (``fake_quant_weight``: a deterministic
  absmean reduction, then t/s_w in the weight's dtype), not in the GEMM's tile loader: at
  training's row counts one pass over W is small, and the copy lets the compiler pipeline B
  into ``tl.dot`` and serves the backward's dh too.

Backward (online only; straight-through: the linear's gradients at the fake-quantised operands):
  dbias = Σ dz (dz = dy: no activation, no dropout in the quantised modes);
  dh = dz @ fake_quant(W) (``gemm.ln_matmul``), then the RMSNorm backward (``norm_backward``,
       which also applies in_act');
  dweight = dz^T @ fake_quant(h), h and s recomputed on load (``_quant_dweight_kernel``, after
       ``_row_stats_kernel`` again).
"""

import torch
import triton
import triton.language as tl

from magneto_kernels import quant as spec
from magneto_kernels.codes import NORMS, QUANT_PACK_UNIT
from magneto_kernels.triton import common, configs, gemm
from magneto_kernels.triton.activations import ACT_NONE, cast_rn, input_activation_args
from magneto_kernels.triton.activations import input_activation as in_act
from magneto_kernels.triton.common import INTERPRET, fp32_dot_precision, new_buffer, rowwise
from magneto_kernels.triton.norm import RMS_NORM
from magneto_kernels.triton.norm_backward import column_sum, norm_backward

ONLINE: tl.constexpr = tl.constexpr(0)
BITNET_OFFLINE: tl.constexpr = tl.constexpr(1)
BITLINEAR: tl.constexpr = tl.constexpr(2)
_MODES = {"bitnet_online": 0, "bitnet_offline": 1, "bitlinear": 2}
"""The kernels' ``QUANT`` constexpr per mode (the op's ``quant``)."""

_QMAX: tl.constexpr = tl.constexpr(float(spec.QMAX))
_ACT_EPS: tl.constexpr = tl.constexpr(spec.ACT_EPS)
_WEIGHT_EPS: tl.constexpr = tl.constexpr(spec.WEIGHT_EPS)
_RNE_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5·2^23
_PACK_UNIT: tl.constexpr = tl.constexpr(QUANT_PACK_UNIT)

STATS_BLOCK, STATS_WARPS = 1024, 4
"""The row statistics kernel's chunk of a row and its warps."""
WEIGHT_BLOCK, WEIGHT_WARPS = 1024, 4
"""The weight passes' (absmean, fake quantisation) elements per program and warps."""


@triton.jit
def _round_half_even(v, BOUND: tl.constexpr):
    """round(v) to nearest, ties to even (torch.round's rule), of float32 v clamped to
    [-BOUND, BOUND] first (BOUND < 2^22): adding and subtracting 1.5·2^23 leaves no fraction
    bits, and float addition rounds to nearest even. (No fast-math in Triton, so it is not
    folded; the interpreter has no ``rint``.)"""
    v = tl.minimum(tl.maximum(v, -BOUND), BOUND)
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _bitnet_h(
    x_ptrs,
    up_offset,
    valid,
    rstd,
    gamma,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
):
    """h = BitNetRMSNorm(in_act(x)) in float32 for the x tile at ``x_ptrs`` (mask ``valid``;
    GATED: x is the gate, its up tile ``up_offset`` elements on), rounded where transformers
    rounds it: a·rstd to x's dtype, then times the weight in x's dtype. ``rstd`` broadcasts over
    the tile's rows, ``gamma`` over its columns; out-of-range entries become 0."""
    dtype: tl.constexpr = x_ptrs.dtype.element_ty
    x = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
    up = x  # the up half, when GATED
    if GATED:
        up = tl.load(x_ptrs + up_offset, mask=valid, other=0.0).to(tl.float32)
    h = in_act(x, up, IN_ACT, GATED, dtype)
    if NORM == RMS_NORM:
        h = cast_rn(h * rstd, dtype).to(tl.float32)
        if HAS_GAMMA:
            h = cast_rn(h * gamma, dtype).to(tl.float32)
    return tl.where(valid, h, 0.0)


@triton.jit
def _act_codes(h, s):
    """ActQuant's codes of float32 h at per-row scale s: round(h·s) clamped to [-128, 127]."""
    return tl.minimum(_round_half_even(h * s, 129.0), 127.0)


@triton.jit
def _row_stats_kernel(
    X,
    GAMMA,
    RSTD,
    AMAX,
    SCALE,
    K,
    stride_xm,
    eps,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    WRITE_RSTD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per row of x: RSTD (RMSNorm; None without a norm) of a = in_act(x), computed (WRITE_RSTD)
    or read (given: the backward's saved one, or the sharded norm's), then SCALE = 127 /
    max(amax, 1e-5) in float32, amax = max|h| over h = BitNetRMSNorm(a), or read from AMAX
    (given: the max over every shard of the row; None otherwise). x is [gate | up] when GATED."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    rk = tl.arange(0, BLOCK)
    rstd = 0.0
    if NORM == RMS_NORM and not WRITE_RSTD:
        rstd = tl.load(RSTD + row)
    if NORM == RMS_NORM and WRITE_RSTD:
        sq = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            valid = k0 + rk < K
            x = tl.load(x_row + k0 + rk, mask=valid, other=0.0).to(tl.float32)
            up = x
            if GATED:
                up = tl.load(x_row + K + k0 + rk, mask=valid, other=0.0).to(tl.float32)
            a = in_act(x, up, IN_ACT, GATED, X.dtype.element_ty)
            sq += a * a
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        tl.store(RSTD + row, rstd)
    if AMAX is None:
        amaxes = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + rk
            valid = k < K
            gamma = tl.zeros([BLOCK], tl.float32)
            if HAS_GAMMA:
                gamma = tl.load(GAMMA + k, mask=valid, other=0.0).to(tl.float32)
            h = _bitnet_h(x_row + k, K, valid, rstd, gamma, NORM, IN_ACT, GATED, HAS_GAMMA)
            amaxes = common.max_nan(amaxes, tl.abs(h))
        amax = tl.reduce(amaxes, 0, common.max_nan)
    else:
        amax = tl.load(AMAX + row)
    amax = common.max_nan(amax, _ACT_EPS)
    tl.store(SCALE + row, tl.full((), _QMAX, tl.float32) / amax)


@triton.jit
def _quant_matmul_kernel(
    X,
    W,
    C,
    RSTD,
    SCALE,
    GAMMA,
    BIAS,
    RES,
    WEIGHT_SCALE,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_cm,
    stride_rm,
    alpha,
    QUANT: tl.constexpr,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    CONCAT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = alpha·residual + Q(h) with h = BitNetRMSNorm(in_act(x)) formed on load and Q
    the projection of mode QUANT (module docstring). W: online, the fake-quantised weight
    (N, K) in x's dtype; offline, the packed weight (N, K/4) uint8 (``quant.pack``: in each
    128-wide block of k, byte b holds k = 32i + b at bits 2i as the code t + 1). RSTD (no norm),
    GAMMA, BIAS, RES and WEIGHT_SCALE (online) are None. DOT_FP32 (interpreter) runs the dot on
    float32 operands, exact for the integer codes too."""
    pid_m, pid_n = gemm._tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = row0 + lm < M
    n_mask = col0 + ln < N
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM == RMS_NORM:
        rstd = tl.load(RSTD + row0 + lm, mask=m_mask, other=0.0)
    s = tl.load(SCALE + row0 + lm, mask=m_mask, other=1.0)
    x_ptrs = X + row0 * stride_xm + (lm[:, None] * stride_xm + rk[None, :])
    w_rows = W + col0 * stride_wn + ln[None, :] * stride_wn
    if QUANT == ONLINE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        gamma = tl.zeros([BLOCK_K], tl.float32)
        if HAS_GAMMA:
            gamma = tl.load(GAMMA + k, mask=k_mask, other=0.0).to(tl.float32)
        h = _bitnet_h(
            x_ptrs, K, m_mask[:, None] & k_mask[None, :], rstd[:, None], gamma[None, :],
            NORM, IN_ACT, GATED, HAS_GAMMA,
        )  # fmt: skip
        q = _act_codes(h, s[:, None])
        w_mask = k_mask[:, None] & n_mask[None, :]
        if QUANT == ONLINE:
            a = cast_rn(q / s[:, None], W.dtype.element_ty)
            b = tl.load(w_rows + k[:, None], mask=w_mask, other=0.0)
            acc = gemm._dot(a, b, acc, DOT_FP32, PRECISION)
        else:
            # The packed byte of k and its 2-bit field: 32 consecutive k share one byte run.
            byte = (k // _PACK_UNIT) * 32 + k % 32
            shift = ((k // 32) % 4) * 2
            packed = tl.load(w_rows + byte[:, None], mask=w_mask, other=0).to(tl.int32)
            t = ((packed >> shift[:, None]) & 3).to(tl.int8) - 1
            if DOT_FP32:
                acc += tl.dot(q, t.to(tl.float32), input_precision="ieee").to(tl.int32)
            else:
                acc = tl.dot(q.to(tl.int8), t, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
    if QUANT != ONLINE:
        ws = tl.load(WEIGHT_SCALE).to(tl.float32)
        y = acc.to(tl.float32)
        bias = tl.zeros([BLOCK_N], tl.float32)
        if HAS_BIAS:
            bias = tl.load(BIAS + col0 + ln, mask=n_mask, other=0.0).to(tl.float32)
        dtype: tl.constexpr = C.dtype.element_ty
        if QUANT == BITLINEAR:
            # BitLinear's post_quant_process (quant._bitlinear): the int32 sum and s rounded to
            # x's dtype, the division in float32 rounded once, then the bias added.
            s_t = cast_rn(s, dtype).to(tl.float32)
            y = cast_rn(cast_rn(y, dtype).to(tl.float32) / (ws * s_t[:, None]), dtype)
            y = y.to(tl.float32) + bias[None, :]
        else:
            y = (y / s[:, None] + bias[None, :]) * ws
        # preact rounded to x's dtype before alpha·residual, as the reference adds them.
        acc = cast_rn(y, dtype).to(tl.float32)
    gemm._epilogue(
        acc, C, None, BIAS if QUANT == ONLINE else None, RES, None, row0, col0, M, N, stride_cm,
        stride_rm, 0, 1.0, alpha, HAS_BIAS and QUANT == ONLINE, ACT_NONE, False, HAS_RES, CONCAT,
    )  # fmt: skip


@triton.jit
def _quant_dweight_kernel(
    DZ,
    X,
    DWEIGHT,
    RSTD,
    SCALE,
    GAMMA,
    M,
    N,
    K,
    stride_dzm,
    stride_xm,
    NORM: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dweight[N, K] = dz^T @ fake_quant(h), reducing over the M rows (BLOCK_M tiles N, BLOCK_N
    tiles K, BLOCK_K the rows, as ``gemm._dweight_kernel``); h and its fake quantisation are
    recomputed on load from x, RSTD and SCALE. RSTD (no norm) and GAMMA are None."""
    pid_n, pid_k = gemm._tile_ids(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    n0 = (pid_n * BLOCK_M).to(tl.int64)
    k0 = (pid_k * BLOCK_N).to(tl.int64)
    ln = tl.arange(0, BLOCK_M)
    lk = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_K)
    n_mask = n0 + ln < N
    k_mask = k0 + lk < K
    gamma = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + k0 + lk, mask=k_mask, other=0.0).to(tl.float32)
    dz_ptrs = DZ + n0 + (rr[None, :] * stride_dzm + ln[:, None])  # dz^T tile (BLOCK_M, BLOCK_K)
    x_ptrs = X + k0 + (rr[:, None] * stride_xm + lk[None, :])  # x tile (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m0 in range(0, M, BLOCK_K):
        rows = m0 + rr
        r_mask = rows < M
        dzt = tl.load(dz_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        rstd = tl.zeros([BLOCK_K], tl.float32)
        if NORM == RMS_NORM:
            rstd = tl.load(RSTD + rows, mask=r_mask, other=0.0)
        s = tl.load(SCALE + rows, mask=r_mask, other=1.0)
        h = _bitnet_h(
            x_ptrs, K, r_mask[:, None] & k_mask[None, :], rstd[:, None], gamma[None, :],
            NORM, IN_ACT, GATED, HAS_GAMMA,
        )  # fmt: skip
        hq = cast_rn(_act_codes(h, s[:, None]) / s[:, None], DZ.dtype.element_ty)
        acc = gemm._dot(dzt, hq, acc, DOT_FP32, PRECISION)
        dz_ptrs += BLOCK_K * stride_dzm
        x_ptrs += BLOCK_K * stride_xm
    tl.store(
        DWEIGHT + n0 * K + k0 + (ln[:, None] * K + lk[None, :]),
        cast_rn(acc, DWEIGHT.dtype.element_ty),
        mask=n_mask[:, None] & k_mask[None, :],
    )


@triton.jit
def _abs_sum_kernel(W, PARTIAL, numel, per_program, BLOCK: tl.constexpr):
    """PARTIAL[p] = Σ |w| over program p's ``per_program`` elements (a multiple of BLOCK), in
    float32, in a fixed order: the first stage of the weight's absmean."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * per_program
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, per_program, BLOCK):
        idx = first + start + offs
        acc += tl.abs(tl.load(W + idx, mask=idx < numel, other=0.0).to(tl.float32))
    tl.store(PARTIAL + pid, tl.sum(acc, axis=0))


@triton.jit
def _fake_quant_weight_kernel(W, ABS_SUM, WQ, numel, count, BLOCK: tl.constexpr):
    """WQ = t / s_w in W's dtype, t = round(w·s_w) clamped to [-1, 1], s_w = 1 / max(mean|W|,
    1e-5) from mean|W| = ABS_SUM / count: Σ|W| over the count = numel elements, or the given
    mean with count 1 (WeightQuant)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    s = 1.0 / tl.maximum(tl.load(ABS_SUM) / count, _WEIGHT_EPS)
    w = tl.load(W + idx, mask=mask, other=0.0).to(tl.float32)
    t = tl.minimum(tl.maximum(_round_half_even(w * s, 2.0), -1.0), 1.0)
    tl.store(WQ + idx, cast_rn(t / s, WQ.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ host wrappers


def _weight_programs(weight) -> int:
    blocks = triton.cdiv(weight.numel(), WEIGHT_BLOCK)
    if weight.device.type != "cuda":
        return min(blocks, 4)
    sms = torch.cuda.get_device_properties(weight.device).multi_processor_count
    return min(blocks, 4 * sms)


def fake_quant_weight(weight, absmean=None):
    """transformers' WeightQuant of the master weight, as a copy in its dtype: Σ|W| in two
    deterministic stages, or ``absmean`` (mean|W|, (1,): tensor parallelism's whole weight's)
    given, then t / s_w elementwise."""
    weight = weight.contiguous()
    numel = weight.numel()
    tile = configs.Tile((("BLOCK", WEIGHT_BLOCK),), WEIGHT_WARPS)
    if absmean is None:
        programs = _weight_programs(weight)
        per_program = triton.cdiv(triton.cdiv(numel, programs), WEIGHT_BLOCK) * WEIGHT_BLOCK
        partial = new_buffer((programs, 1), torch.float32, weight.device)
        configs.launch(
            _abs_sum_kernel,
            lambda meta: (programs,),
            [tile],
            (),
            W=weight,
            PARTIAL=partial,
            numel=numel,
            per_program=per_program,
        )
        abs_sum, count = column_sum(partial, torch.float32), numel
    else:
        abs_sum, count = absmean.float().contiguous(), 1
    wq = new_buffer(weight.shape, weight.dtype, weight.device)
    configs.launch(
        _fake_quant_weight_kernel,
        lambda meta: (triton.cdiv(numel, WEIGHT_BLOCK),),
        [tile],
        (),
        W=weight,
        ABS_SUM=abs_sum,
        WQ=wq,
        numel=numel,
        count=count,
    )
    return wq


def row_stats(x, ln_weight, eps, norm, input_activation, in_features, rstd=None, row_amax=None):
    """(rstd, scale) per row of x (``_row_stats_kernel``): rstd empty without a norm; given
    (the backward's saved one, the sharded norm's), it is read, not computed; so is
    ``row_amax`` (tensor parallelism's max|h| over every shard of the row)."""
    rows = x.shape[0]
    write_rstd = rstd is None
    if write_rstd:
        rstd = new_buffer((rows if norm != "none" else 0,), torch.float32, x.device)
    scale = new_buffer((rows,), torch.float32, x.device)
    if rows == 0:
        return rstd, scale
    block = min(STATS_BLOCK, triton.next_power_of_2(in_features))
    tile = configs.Tile((("BLOCK", block),), STATS_WARPS)
    configs.launch(
        _row_stats_kernel,
        lambda meta: (rows,),
        [tile],
        (),
        X=x,
        GAMMA=ln_weight,
        RSTD=rstd if norm != "none" else None,
        AMAX=row_amax,
        SCALE=scale,
        K=in_features,
        stride_xm=x.stride(0),
        eps=eps,
        NORM=NORMS[norm],
        **input_activation_args(input_activation),
        HAS_GAMMA=ln_weight is not None,
        WRITE_RSTD=write_rstd,
    )
    return rstd, scale


def _dot_args(dtype, integer=False):
    return {
        "DOT_FP32": INTERPRET and (integer or dtype != torch.float16),
        "PRECISION": fp32_dot_precision() if dtype == torch.float32 else "tf32",
    }


def ln_linear(
    x, ln_weight, weight, bias, residual, eps, norm, input_activation, alpha, quant, weight_scale,
    rstd=None, row_amax=None,
):  # fmt: skip
    """(out, mean, rstd, preact) of ln_linear's quantised mode ``quant``, the triton family's
    outputs: mean and preact empty (RMSNorm, no output activation), rstd empty without a
    norm. Tensor parallelism: ``rstd`` and ``row_amax`` (``row_stats``) and, online,
    ``weight_scale`` (the whole weight's mean|W|) given."""
    x, residual, ln_weight, bias = rowwise(x, residual, ln_weight, bias)
    in_features = weight.shape[1] * (1 if quant == "bitnet_online" else 4)
    empty = x.new_empty((0,), dtype=torch.float32)
    rstd, scale = row_stats(x, ln_weight, eps, norm, input_activation, in_features, rstd, row_amax)
    out = project(
        x, ln_weight, weight, bias, residual, norm, input_activation, alpha, quant, weight_scale,
        rstd, scale,
    )  # fmt: skip
    return out, empty, rstd, x.new_empty((0,))


def project(
    x, ln_weight, weight, bias, residual, norm, input_activation, alpha, quant, weight_scale, rstd,
    scale, out=None,
):  # fmt: skip
    """``_quant_matmul_kernel``'s output for x's rows (rowwise) of statistics (rstd, scale)
    from ``row_stats``: ln_linear's, or one weight's of ln_linear_group (which takes the row
    statistics once for every weight). Online, ``weight_scale`` is the given mean|W| or None.
    Into ``out`` where given (unit column stride: a column range of the group's concat output),
    else into a new tensor."""
    rows = x.shape[0]
    online = quant == "bitnet_online"
    n, in_features = weight.shape[0], weight.shape[1] * (1 if online else 4)
    if out is None:
        out = new_buffer((rows, n), x.dtype, x.device)
    if rows == 0 or n == 0:
        return out
    w = fake_quant_weight(weight, weight_scale) if online else weight
    flags = dict(
        QUANT=_MODES[quant],
        NORM=NORMS[norm],
        **input_activation_args(input_activation),
        HAS_GAMMA=ln_weight is not None,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        # C's row stride is N but in a column range of a wider output (ln_linear_group's
        # concat): the epilogue's strided store only there (it spilled 4 B on sm_80, Triton 3.9)
        CONCAT=out.stride(0) != n,
    )
    dot = _dot_args(x.dtype, integer=not online)
    args = dict(
        X=x,
        W=w,
        C=out,
        RSTD=rstd if norm != "none" else None,
        SCALE=scale,
        GAMMA=ln_weight,
        BIAS=bias,
        RES=residual,
        WEIGHT_SCALE=None if online else weight_scale,
        M=rows,
        N=n,
        K=in_features,
        stride_xm=x.stride(0),
        stride_wn=w.stride(0),
        stride_cm=out.stride(0),
        stride_rm=0 if residual is None else residual.stride(0),
        alpha=alpha,
    )
    aligned = gemm._aligned(args)
    # The pipelined loads per stage (Tile.smem): x's tiles (two when gated) and, online, the
    # weight's; offline the packed bytes, with x's tiles counted in bytes.
    x_tiles = 1 + flags["GATED"]
    if online:
        tiles = configs.gemm_tiles(x.dtype, rows, aligned, a_tiles=x_tiles)
    else:
        tiles = configs.gemm_tiles(torch.int8, rows, aligned, a_tiles=x_tiles * x.element_size())

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    sizes = (configs.row_bucket(rows), n, in_features, x.dtype, aligned)
    key = (*sizes, *flags.values(), *dot.values())
    configs.launch(_quant_matmul_kernel, grid, tiles, key, **args, **flags, **dot, GROUP_M=8)
    return out


def ln_linear_backward(
    grad_out, x, ln_weight, weight, rstd, norm, input_activation, output_mask, weight_scale=None,
    row_amax=None, row_sums=None,
):  # fmt: skip
    """(dx, dln_weight, dln_bias, dweight, dbias) of the online mode (module docstring), at the
    forward's given ``weight_scale`` and ``row_amax`` (tensor parallelism) when not None.
    ``row_sums`` given (ln_linear_backward_partial): it receives the norm backward's row sums,
    dx's place holds dh and the norm's gradients are not formed."""
    grad_out, x, ln_weight = rowwise(grad_out, x, ln_weight)
    rows = x.shape[0]
    n, k = weight.shape
    empty = x.new_empty((0,))
    want_dx, want_dgamma, _, want_dweight, want_dbias = (bool(m) for m in output_mask)
    want_dgamma = want_dgamma and ln_weight is not None
    need_dh = want_dx or want_dgamma or row_sums is not None
    dx = dgamma = dweight = dbias = empty
    if rows == 0:
        zeros = torch.zeros_like
        return (
            new_buffer(x.shape, x.dtype, x.device) if want_dx else empty,
            zeros(ln_weight) if want_dgamma else empty,
            empty,
            zeros(weight) if want_dweight else empty,
            weight.new_zeros((n,)) if want_dbias else empty,
        )
    dz = grad_out if grad_out.dtype == weight.dtype else grad_out.to(weight.dtype)
    if want_dbias:
        dbias = column_sum(dz.float(), weight.dtype)
    if want_dweight:
        _, scale = row_stats(x, ln_weight, 0.0, norm, input_activation, k, rstd, row_amax)
        dweight = quant_dweight(dz, x, ln_weight, weight, rstd, scale, norm, input_activation)
    if need_dh:
        dh = new_buffer((rows, k), x.dtype, x.device)
        gemm.ln_matmul(dz, fake_quant_weight(weight, weight_scale), dh)
        if row_sums is not None:
            norm_backward(
                dh, x, ln_weight, None, None, rstd, None, norm, [False] * 3,
                input_activation=input_activation, row_sums=row_sums,
            )  # fmt: skip
            return dh, dgamma, empty, dweight, dbias
        dx, dgamma, _ = norm_backward(
            dh, x, ln_weight, None, None, rstd if norm != "none" else None, None, norm,
            [want_dx, want_dgamma, False], input_activation=input_activation,
        )  # fmt: skip
    return dx, dgamma, empty, dweight, dbias


def quant_dweight(dz, x, ln_weight, weight, rstd, scale, norm, input_activation):
    """dweight = dz^T @ fake_quant(h) (``_quant_dweight_kernel``; h and its codes recomputed on
    load from x, rstd and the row scales of ``row_stats``)."""
    n, k = weight.shape
    dweight = new_buffer(weight.shape, weight.dtype, x.device)
    flags = dict(
        NORM=NORMS[norm],
        **input_activation_args(input_activation),
        HAS_GAMMA=ln_weight is not None,
    )
    gemm._gemm(
        _quant_dweight_kernel, n, k, weight.dtype, flags, "b", DZ=dz, X=x, DWEIGHT=dweight,
        RSTD=rstd if norm != "none" else None, SCALE=scale, GAMMA=ln_weight, M=x.shape[0], N=n,
        K=k, stride_dzm=dz.stride(0), stride_xm=x.stride(0),
    )  # fmt: skip
    return dweight
