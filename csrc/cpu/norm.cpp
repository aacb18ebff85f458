// Tensor-to-kernel glue of the CPU norm passes (csrc/cpu/ops.h), shared by layer_norm,
// add_layer_norm and ln_linear's prologue and backward.
#include "cpu/kernels.h"
#include "cpu/ops.h"

namespace magneto::cpu {
namespace {

// The norm's width: x's, or half of it for a gated input activation (x = [gate | up]).
int64_t norm_cols(const Tensor& x, Activation input_activation) {
  return is_gated(input_activation) ? x.size(1) / 2 : x.size(1);
}

// Norm parameters as float32 pointers for the kernels (a float32 copy when stored in
// bf16/fp16): the kernels take one parameter type, and the copy is a (cols,) vector.
struct ParamF32 {
  Tensor t;
  explicit ParamF32(const OptTensor& p) {
    if (p.has_value()) t = p->scalar_type() == at::kFloat ? *p : p->to(at::kFloat);
  }
  const float* ptr() const { return t.defined() ? t.data_ptr<float>() : nullptr; }
};

}  // namespace

void run_norm_forward(const Tensor& x, const OptTensor& residual, double alpha,
                      const OptTensor& gamma, const OptTensor& beta, double eps, Norm norm,
                      Activation input_activation, const Tensor& y, const Tensor& sum,
                      const Tensor& mean, const Tensor& rstd) {
  const ParamF32 g(gamma), b(beta);
  NormForward a;
  a.dtype = dtype_code(x.scalar_type());
  a.norm = norm;
  a.input_activation = input_activation;
  a.rows = x.size(0);
  a.cols = norm_cols(x, input_activation);
  a.x = x.data_ptr();
  a.x_stride = x.size(1);
  if (residual.has_value()) {
    a.residual = residual->data_ptr();
    a.residual_stride = a.cols;
    a.alpha = static_cast<float>(alpha);
  }
  a.gamma = g.ptr();
  a.beta = b.ptr();
  a.eps = static_cast<float>(eps);
  a.y = y.data_ptr();
  a.y_stride = a.cols;
  if (sum.defined()) {
    a.sum = sum.data_ptr();
    a.sum_stride = a.cols;
  }
  a.mean = opt_float_ptr(mean);
  a.rstd = opt_float_ptr(rstd);
  norm_forward(a);
}

void run_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& gamma,
                       const OptTensor& beta, const Tensor& mean, const Tensor& rstd,
                       const OptTensor& grad_accum, Norm norm, Activation input_activation,
                       const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta,
                       const Tensor& h) {
  const ParamF32 g(gamma), b(beta);
  const Tensor dgamma32 = dgamma.numel() > 0 ? grad_f32(dgamma) : Tensor();
  const Tensor dbeta32 = dbeta.numel() > 0 ? grad_f32(dbeta) : Tensor();
  NormBackward a;
  a.dtype = dtype_code(x.scalar_type());
  a.norm = norm;
  a.input_activation = input_activation;
  a.rows = x.size(0);
  a.cols = norm_cols(x, input_activation);
  if (dy.defined()) {
    a.dy = dy.data_ptr();
    a.dy_stride = a.cols;
  }
  a.x = x.data_ptr();
  a.x_stride = x.size(1);
  a.mean = opt_float_ptr(mean);
  a.rstd = opt_float_ptr(rstd);
  a.gamma = g.ptr();
  a.beta = b.ptr();
  if (grad_accum.has_value()) {
    a.grad_accum = grad_accum->data_ptr();
    a.grad_accum_stride = x.size(1);
  }
  if (dx.numel() > 0) {
    a.dx = dx.data_ptr();
    a.dx_stride = x.size(1);
  }
  a.dgamma = dgamma32.defined() ? dgamma32.data_ptr<float>() : nullptr;
  a.dbeta = dbeta32.defined() ? dbeta32.data_ptr<float>() : nullptr;
  if (h.defined()) {
    a.h = h.data_ptr();
    a.h_stride = a.cols;
  }
  norm_backward(a);
  if (dgamma32.defined()) copy_back(dgamma, dgamma32);
  if (dbeta32.defined()) copy_back(dbeta, dbeta32);
}

}  // namespace magneto::cpu
