"""The fused ``ln_linear`` op in Triton: ``alpha·residual + dropout(act(h @ weight^T + bias))``
with ``h = N(in_act(x))`` (the vocabulary is docs/design.md, Glossary).

Forward, two launches:
  1. the row statistics (``norm.norm_forward`` with ``write_y=False``): mean and rstd of
     in_act(x) per row, float32, merged chunk-wise for wide rows (stable for |mean| >> std);
  2. one GEMM that normalises on load (``gemm.ln_matmul``), its epilogue adding the bias,
     storing preact (with an output activation), applying the activation, dropout and
     ``alpha·residual``. h never touches memory; the numerics are the unfused computation's
     (docs/design.md, Numerics: why the "fold" variant is not kept).

Backward (``ln_linear_backward``):
  linear_epilogue_backward: dz = dy ⊙ keep/(1-p) ⊙ act'(preact) (mask regenerated from the
       seed), with per-row-block partial sums of dz for dbias (summed in a fixed order);
  dweight = dz^T @ h   a GEMM that recomputes h on load from x and the saved mean/rstd, as the
                       forward does (``gemm.dweight``);
  dh = dz @ weight     (rounded to x's dtype, as on every backend: docs/design.md, Numerics);
  dx, dgamma, dbeta from the norm-backward row kernel, which also applies in_act'(x).

Gated input activations: x = [gate | up] has 2K columns, and every place that applies in_act
to x (the row statistics, both GEMMs, the norm backward) forms a = act(gate)·up from both
halves; the norm backward writes dx = [da·up·act'(gate) | da·act(gate)].
"""

import torch
import triton
import triton.language as tl

from magneto_kernels.codes import ACTIVATIONS
from magneto_kernels.triton import configs, gemm
from magneto_kernels.triton.activations import ACT_NONE, activation_grad, cast_rn
from magneto_kernels.triton.common import new_buffer, rowwise
from magneto_kernels.triton.norm import norm_forward
from magneto_kernels.triton.norm_backward import column_sum, norm_backward
from magneto_kernels.triton.philox import dropout_keep

DZ_BLOCK_M, DZ_WARPS = 32, 4
"""The dz pass's tile: DZ_BLOCK_M rows by up to 128 columns (its dropout holds four Philox
words per element: tests/test_triton_compile.py checks it spills nothing)."""


@triton.jit
def _linear_epilogue_backward_kernel(
    DY,
    PREACT,
    SEED,
    DZ,
    DBIAS_PART,
    M,
    N,
    stride_dym,
    stride_pm,
    threshold,
    dropout_scale,
    ACT: tl.constexpr,
    DROPOUT: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    WANT_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dz = dy ⊙ keep/(1-p) ⊙ act'(preact) into contiguous DZ, and row-block partial sums of dz
    for dbias. dy and preact have row strides stride_dym, stride_pm. PREACT (no activation),
    SEED (no dropout), DZ and DBIAS_PART (not wanted) are None."""
    pid_m = tl.program_id(0)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_N
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    n_mask = col0 + ln < N
    mask = (row0 + lm < M)[:, None] & n_mask[None, :]
    tile = row0 * N + col0  # 64-bit tile origin, 32-bit offsets inside the tile
    offs = lm[:, None] * N + ln[None, :]  # in the (M, N) output: dz, the dropout mask
    dy_offs = row0 * stride_dym + col0 + (lm[:, None] * stride_dym + ln[None, :])
    dz = tl.load(DY + dy_offs, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        dz = tl.where(
            dropout_keep(SEED, tile + offs.to(tl.int64), threshold), dz * dropout_scale, 0.0
        )
    if ACT != ACT_NONE:
        preact_offs = row0 * stride_pm + col0 + (lm[:, None] * stride_pm + ln[None, :])
        preact = tl.load(PREACT + preact_offs, mask=mask, other=0.0).to(tl.float32)
        dz = dz * activation_grad(preact, ACT)
    if WRITE_DZ:
        tl.store(DZ + tile + offs, cast_rn(dz, DZ.dtype.element_ty), mask=mask)
    if WANT_DBIAS:
        tl.store(DBIAS_PART + pid_m.to(tl.int64) * N + col0 + ln, tl.sum(dz, axis=0), mask=n_mask)


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
    stats=None,
):
    """stats: (mean, rstd) to normalise with (the sharded norm's), returned as copies; else the
    statistics launch computes them."""
    rows = x.shape[0]
    n = weight.shape[0]
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    x, residual, ln_weight, ln_bias, bias = rowwise(x, residual, ln_weight, ln_bias, bias)
    if stats is not None:
        mean, rstd = (t.clone() for t in stats)
    elif norm != "none":
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
    gemm.ln_matmul(
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
    row_sums=None,
):
    # The kernels' gamma/beta are the op's ln_weight/ln_bias; grad_out is dy. x is (rows, 2k)
    # for a gated input activation. row_sums given (ln_linear_backward_partial): it receives the
    # norm backward's row sums, dx's place holds dh and the norm's gradients are not formed.
    grad_out, x, preact, ln_weight, ln_bias = rowwise(grad_out, x, preact, ln_weight, ln_bias)
    rows = x.shape[0]
    n, k = weight.shape
    empty = x.new_empty((0,))
    want_dx, want_dgamma, want_dbeta, want_dweight, want_dbias = (bool(m) for m in output_mask)
    want_dgamma = want_dgamma and ln_weight is not None
    want_dbeta = want_dbeta and ln_bias is not None
    need_dh = want_dx or want_dgamma or want_dbeta or row_sums is not None
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
    threshold, scale = gemm.dropout_args(dropout_p)
    transform = activation != "none" or dropout_p > 0.0
    dz = grad_out
    if transform or want_dbias:
        block_n = min(128, triton.next_power_of_2(n))
        tile = configs.Tile((("BLOCK_M", DZ_BLOCK_M), ("BLOCK_N", block_n)), DZ_WARPS)
        row_blocks = triton.cdiv(rows, DZ_BLOCK_M)
        if transform and (want_dweight or need_dh):
            dz = new_buffer((rows, n), weight.dtype, x.device)
        dbias_part = new_buffer((row_blocks, n), torch.float32, x.device) if want_dbias else None
        configs.launch(
            _linear_epilogue_backward_kernel,
            lambda meta: (row_blocks, triton.cdiv(n, block_n)),
            [tile],
            (),
            DY=grad_out,
            PREACT=preact if activation != "none" else None,
            SEED=seed if dropout_p > 0.0 else None,
            DZ=dz if dz is not grad_out else None,
            DBIAS_PART=dbias_part,
            M=rows,
            N=n,
            stride_dym=grad_out.stride(0),
            stride_pm=preact.stride(0) if activation != "none" else 0,
            threshold=threshold,
            dropout_scale=scale,
            ACT=ACTIVATIONS[activation],
            DROPOUT=dropout_p > 0.0,
            WRITE_DZ=dz is not grad_out,
            WANT_DBIAS=want_dbias,
        )
        if want_dbias:
            dbias = column_sum(dbias_part, weight.dtype)
    if dz.dtype != weight.dtype:
        dz = dz.to(weight.dtype)

    # dweight = dz^T @ h, h recomputed on load ---------------------------------------------------
    if want_dweight:
        dweight = new_buffer(weight.shape, weight.dtype, x.device)
        gemm.dweight(
            dz,
            x,
            dweight,
            norm,
            input_activation,
            mean=mean,
            rstd=rstd,
            gamma=ln_weight,
            beta=ln_bias,
        )

    # dh = dz @ weight, then the norm backward (with in_act') -----------------------------------
    dx = dgamma = dbeta = empty
    if need_dh:
        dh = new_buffer((rows, k), x.dtype, x.device)
        gemm.ln_matmul(dz, weight, dh)
        if row_sums is not None:
            norm_backward(
                dh, x, ln_weight, ln_bias, mean, rstd, None, norm, [False] * 3,
                input_activation=input_activation, row_sums=row_sums,
            )  # fmt: skip
            return dh, dgamma, dbeta, dweight, dbias
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
