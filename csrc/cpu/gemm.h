// The GEMM engine of the CPU ln_linear (csrc/cpu/ln_linear.cpp runs it between our memory-bound
// passes).
//
// torch's CPU at::mm runs fp32 through MKL, and MKL takes its AVX2 code path on non-Intel CPUs: on
// an AMD EPYC with AVX-512 it reaches ~100 GFLOP/s on one core where oneDNN's matmul reaches ~220
// (bench/bench_cpu.py measures both side by side). On Intel CPUs MKL is the faster of the two.
// So the engine is at::mm on Intel CPUs, and elsewhere oneDNN's matmul where torch has it and the
// CPU runs it:
//
//   MAGNETO_CPU_GEMM=auto (default)  ATen on Intel CPUs; elsewhere oneDNN if usable, else ATen
//                   =onednn          oneDNN; an error if it is not usable
//                   =aten            at::mm / at::addmm (MKL or whatever BLAS torch was built with)
//
// oneDNN is reached through at::native::mkldnn_matmul, which libtorch_cpu exports but does not
// ship a header for, and the registered op mkldnn::_linear_pointwise; both are looked up at run
// time, so a torch without them falls back to ATen instead of failing to import. It honours
// torch.backends.mkldnn.matmul.fp32_precision (full fp32 unless the user opted into bf16/tf32)
// and torch.backends.mkldnn.enabled.
#pragma once

#include <optional>
#include <string>

#include <ATen/ATen.h>

namespace magneto::cpu::gemm {

// result = a @ b (accumulate = false) or result += a @ b (accumulate = true). a and b may be
// contiguous or transposed views of contiguous tensors; result is contiguous.
void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& result, bool accumulate);

// x @ weight^T + bias (bias optional) into a new tensor: with oneDNN, its inner-product primitive
// adds the bias in the GEMM's epilogue (mkldnn::_linear_pointwise); accumulating into a
// bias-filled output instead costs an extra read of the output, ~8% at M=1024, N=3072.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// The engine matmul uses now: "onednn" or "aten".
std::string engine();

// Sets the choice ("auto", "onednn" or "aten"), overriding MAGNETO_CPU_GEMM; benchmarks and tests.
void set_engine(const std::string& choice);

}  // namespace magneto::cpu::gemm
