// The GEMM engine of the CPU ln_linear (csrc/cpu/backend.cpp runs it between our memory-bound
// passes). Engines, each torch's and reached through public, registered entry points, bar ours:
// - aten: at::mm / at::addmm, which torch's CPU wheels run through MKL;
// - onednn: torch's registered oneDNN linear operator (mkldnn::_linear_pointwise, the op
//   torch.compile's CPU path emits), found through the dispatcher by its schema name, so that a
//   torch without it (or whose signature changed) falls back to aten with no error;
// - widened (bf16/fp16 only): aten's float32 GEMM on operands widened to float32, rounded once
//   into the dtype. On a CPU without bf16/fp16 arithmetic (AVX2) torch's own GEMM in those
//   dtypes is a generic loop several times slower than its float32 one, and oneDNN refuses them.
// Which is faster depends on the CPU (MKL takes its AVX2 path on AMD CPUs; oneDNN reaches
// AMX-BF16 on Intel's), the dtype, the GEMM's role and its size, so it is measured, once per
// process and per (role, dtype, M/N/K rounded up to powers of two, thread count, output given or
// new: oneDNN's copy into a given one is part of its time), on the call's own operands (process
// CPU time; another engine must win by 5%), and the chosen engine's result is the one returned
// (a repeated call is bit-identical). MAGNETO_CPU_GEMM=aten|onednn|few_rows|widened|auto pins
// the choice (few_rows: the few-row kernel where it fits, aten elsewhere; widened: aten on fp32
// operands; set_policy for tests).
// The forward GEMM of 1-16 rows has one more engine, our few-row kernel (kernels.h,
// linear_few_rows; AVX2 and AVX-512 builds), which streams the weight once where both BLAS pack
// it first: in fp32 it always runs (level or faster on every CPU measured with the weight
// coming from memory, as a decoding step reads it, which a first-use measurement in cache does
// not see); in bf16/fp16 it is a candidate of the measurement (in bf16 it runs on AMX-BF16
// tiles or AVX512-BF16 dot products where the CPU has them, few_rows.h).
// The measurements: docs/design.md, Decisions.
#pragma once

#include <optional>
#include <string>

#include <ATen/ATen.h>

namespace magneto::cpu::gemm {

// A GEMM's role in ln_linear, which keys the engine choice: the forward (preact = h W^T), the
// input gradient (dh = dz W) and the weight gradient (dweight = dz^T h).
enum class Role { kForward, kInputGrad, kWeightGrad };

// result = a @ b (accumulate = false) or result += a @ b (accumulate = true), returned. a and b
// may be contiguous or transposed views of contiguous tensors, or have unit column stride (a
// column range of a wider tensor); so may result. An undefined result (accumulate false): a new
// tensor, the engine's own output (oneDNN's is not copied; it is measured apart from the form
// into a given output).
at::Tensor matmul(Role role, const at::Tensor& a, const at::Tensor& b, const at::Tensor& result,
                  bool accumulate);

// x @ weight^T + bias (bias optional) into a new tensor, or into out where given (unit column
// stride, any row stride: a column range of a wider tensor), the same bits either way; x and
// weight contiguous.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& out = at::Tensor());

// What runs the GEMMs: the engines present, the policy, the few-row kernel's rows where the
// build has it, and every choice measured so far, per role.
std::string engine();

// Tests and benchmarks: the policy ("auto", "aten", "onednn", "few_rows" or "widened"; the
// environment's MAGNETO_CPU_GEMM until set), hide_onednn as if torch had no oneDNN operator;
// forgets the choices measured so far.
void set_policy(const std::string& policy, bool hide_onednn);

}  // namespace magneto::cpu::gemm
