// magneto::int8_head on CPU tensors: the int8 output projection (magneto_kernels/library.py,
// INT8_HEAD_SCHEMA), its checks and the call of the CPU kernel (csrc/cpu/kernels.h, Int8Head).
// One op outside the backend families: it has no autograd (decoding) and one kernel, registered
// at the CPU key; every other device runs the reference (magneto_kernels/reference.py,
// int8_head) that library.py registers for them. The messages are word for word those of
// magneto_kernels/checks.py, check_int8_head.
#include <string>

#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"
#include "tensor_utils.h"

namespace magneto {
namespace {

// A per-output-feature vector (scale, bias): (out_features,), x's dtype and device.
void check_vector(const char* name, const Tensor& t, const Tensor& x, int64_t out_features) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == out_features, name, " must have shape (",
                    out_features, ",), got ", py_shape(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ",
                   py_dtype(x.scalar_type()), ", got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on x's device ", x.device(),
                    ", got ", t.device());
}

Tensor int8_head_cpu(const Tensor& x, const Tensor& weight, const Tensor& scale,
                     const OptTensor& bias) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "x must be float32, bfloat16 or float16, got ", py_dtype(dtype));
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension, got a scalar");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, "weight must be int8, got ",
                   py_dtype(weight.scalar_type()));
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(-1),
                    "weight must have shape (out_features, ", x.size(-1), "), got ",
                    py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight must be on x's device ", x.device(),
                    ", got ", weight.device());
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  check_vector("scale", scale, x, out_features);
  if (bias.has_value()) check_vector("bias", *bias, x, out_features);

  const Tensor rows = x.reshape({-1, in_features}).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor s = scale.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  Tensor y = new_tensor({rows.size(0), out_features}, x.options());
  if (rows.size(0) > 0 && out_features > 0) {
    cpu::int8_head({dtype_code(dtype), rows.size(0), in_features, out_features, rows.data_ptr(),
                    in_features, w.data_ptr<int8_t>(), s.data_ptr(),
                    b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), out_features});
  }
  return y.view(out_shape);
}

}  // namespace
}  // namespace magneto

TORCH_LIBRARY_IMPL(magneto, CPU, m) {
  m.impl("int8_head", TORCH_FN(magneto::int8_head_cpu));
}
