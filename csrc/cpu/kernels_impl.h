// Implementation of the CPU kernels of kernels.h, compiled once per instruction set: each
// kernels_<isa>.cpp defines MAGNETO_ISA (the namespace the functions land in) and the
// CPU_CAPABILITY macros that select at::vec's implementation, then includes this file.
//
// Every kernel works on float32 copies of one row at a time (a row of bf16/fp16 is converted into
// a per-thread buffer of `cols` floats, which stays in L1/L2), so the arithmetic is written once,
// over Vectorized<float>. Parallelism is over rows; column reductions (dgamma, dbeta, dbias) use
// fixed row chunks whose partial sums are added in a fixed order, so results do not depend on the
// number of threads. One header per concern: rows.h (row access, prefetch, row loops and
// reductions), activations.h, philox.h (dropout), norm_forward.h, norm_backward.h,
// linear_epilogue.h, few_rows.h (the decode-size GEMM), int8_head.h (the int8 output projection),
// quant.h (BitNet's integer projection); each defines its entry points of
// kernels.h.
#pragma once

#include "cpu/few_rows.h"
#include "cpu/int8_head.h"
#include "cpu/linear_epilogue.h"
#include "cpu/norm_backward.h"
#include "cpu/norm_forward.h"
#include "cpu/quant.h"
