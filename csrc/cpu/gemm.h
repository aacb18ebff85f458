// The GEMM engine of the CPU ln_linear (csrc/cpu/ln_linear.cpp runs it between our memory-bound
// passes): torch's own at::mm / at::addmm, which torch's CPU wheels run through MKL.
//
// Only public ATen calls: the engine follows torch's BLAS and its settings, and a torch release
// cannot break it. Measured against the alternatives (one thread, fp32, ln_linear's three GEMM
// shapes at M=1024 and the decode shape 1x768->2304; docs/design.md, Kernels per backend):
// - OpenBLAS 0.3.34 (scipy-openblas32, the build numpy and SciPy ship) on an Intel Sapphire
//   Rapids: 1.01-1.14x MKL's time with its AVX-512 kernels, 0.94-1.05x with its AVX2 ones
//   against MKL held to AVX2, and 2.5x at one row;
// - oneDNN's fp32 matmul has no public entry point in torch (at::mm reaches it only for
//   bf16/fp16 or when the user allows reduced-precision fp32), so it could only be reached
//   through torch internals. It was ~2x faster than MKL on an AMD EPYC with AVX-512, where MKL
//   takes its AVX2 code path: that is the gap this choice leaves (README, Limits).
#pragma once

#include <optional>
#include <string>

#include <ATen/ATen.h>

namespace magneto::cpu::gemm {

// result = a @ b (accumulate = false) or result += a @ b (accumulate = true). a and b may be
// contiguous or transposed views of contiguous tensors; result is contiguous.
void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& result, bool accumulate);

// x @ weight^T + bias (bias optional) into a new tensor.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// What runs the GEMMs: "aten (mkl)" when torch was built with MKL, else "aten".
std::string engine();

}  // namespace magneto::cpu::gemm
