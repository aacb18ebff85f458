// The GEMM engine of the CPU ln_linear (csrc/cpu/backend.cpp runs it between our memory-bound
// passes): torch's own at::mm / at::addmm, which torch's CPU wheels run through MKL, and for the
// forward GEMM of 1-16 rows in fp32 our few-row kernel (kernels.h, linear_few_rows) on the AVX2
// and AVX-512 builds.
//
// Only public ATen calls: the engine follows torch's BLAS and its settings, and a torch release
// cannot break it. OpenBLAS was no faster; oneDNN's fp32 matmul, faster on AMD CPUs, has no
// public entry point in torch. At 1-16 rows BLAS GEMMs pack the weight first, which costs more
// than streaming it, hence the few-row kernel; the portable build's at::vec is scalar code, so it
// keeps at::addmm. The measurements: docs/design.md, Decisions.
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
