// The GEMM engine of the CPU ln_linear (csrc/cpu/backend.cpp runs it between our memory-bound
// passes): torch's own at::mm / at::addmm, which torch's CPU wheels run through MKL, and for the
// forward GEMM of 1-16 rows in fp32 our few-row kernel (kernels.h, linear_few_rows) on the AVX2
// and AVX-512 builds.
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
// - At 2-16 rows MKL packs the weight before multiplying, and that costs more than streaming it:
//   at 8 rows it runs at 8-9 GB/s of weight where one row runs at ~23. The few-row kernel streams
//   each weight row once per tile of rows. Its time / addmm's (Sapphire Rapids, one thread,
//   K×N = 768×2304, 768×3072, 3072×768; bench/results/gemm-rows-cpu.md):
//     AVX-512: 1-2 rows 0.99-1.02, 4 rows 0.56, 8 rows 0.43-0.50, 16 rows 0.72-0.84;
//     AVX2 (MKL held to AVX2): 1 row 1.00, 2 rows 0.59-0.62, 4 rows 0.54, 8 rows 0.61-0.67,
//              16 rows 0.86-0.89.
//   With two threads (AVX-512, 768x3072 and 3072x768): 1 row 0.98-1.00, 4 rows 0.63, 8 rows
//   0.50-0.52, 16 rows 0.75-0.84. A build that ran the kernel at 32 rows measured 0.96-1.15
//   there (one thread), so 17 rows and more stay with MKL.
//   The portable build's at::vec is scalar code (4-6x slower than MKL), so it keeps at::addmm.
#pragma once

#include <optional>
#include <string>

#include <ATen/ATen.h>

namespace magneto::cpu::gemm {

// result = a @ b (accumulate = false) or result += a @ b (accumulate = true). a and b may be
// contiguous or transposed views of contiguous tensors; result is contiguous.
void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& result, bool accumulate);

// x @ weight^T + bias (bias optional) into a new tensor; x and weight contiguous.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// What runs the GEMMs: "aten (mkl)" when torch was built with MKL, else "aten", followed by the
// few-row kernel's rows where the build has it.
std::string engine();

}  // namespace magneto::cpu::gemm
