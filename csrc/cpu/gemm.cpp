#include "cpu/gemm.h"

#include "cpu/kernels.h"
#include "tensor_utils.h"

namespace magneto::cpu::gemm {

using at::Tensor;

std::string engine() {
  std::string name = at::hasMKL() ? "aten (mkl)" : "aten";
  const int64_t few = linear_few_rows_max();
  if (few > 0) {
    name += "; fp32 linear at 1-" + std::to_string(few) + " rows: magneto few-row kernel";
  }
  return name;
}

Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const int64_t rows = x.size(0);
  if (x.scalar_type() != at::kFloat || rows == 0 || rows > linear_few_rows_max()) {
    return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
  Tensor y = new_tensor({rows, weight.size(0)}, x.options());
  LinearFewRows a;
  a.rows = rows;
  a.in_features = weight.size(1);
  a.out_features = weight.size(0);
  a.x = x.data_ptr<float>();
  a.x_stride = x.stride(0);
  a.weight = weight.data_ptr<float>();
  a.weight_stride = weight.stride(0);
  a.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.y_stride = a.out_features;
  linear_few_rows(a);
  return y;
}

void matmul(const Tensor& a, const Tensor& b, const Tensor& result, bool accumulate) {
  if (accumulate) {
    result.addmm_(a, b);
  } else {
    at::mm_out(const_cast<Tensor&>(result), a, b);
  }
}

}  // namespace magneto::cpu::gemm
