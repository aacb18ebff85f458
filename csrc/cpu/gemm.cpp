#include "cpu/gemm.h"

namespace magneto::cpu::gemm {

using at::Tensor;

std::string engine() { return at::hasMKL() ? "aten (mkl)" : "aten"; }

Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

void matmul(const Tensor& a, const Tensor& b, const Tensor& result, bool accumulate) {
  if (accumulate) {
    result.addmm_(a, b);
  } else {
    at::mm_out(const_cast<Tensor&>(result), a, b);
  }
}

}  // namespace magneto::cpu::gemm
