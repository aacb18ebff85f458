// Tensor-to-launcher glue of the CUDA norm passes (csrc/cuda/ops.h), shared by layer_norm,
// add_layer_norm and ln_linear's prologue and backward.
#include "cuda/launch_utils.h"
#include "cuda/ops.h"

namespace magneto::cuda {
namespace {

const void* opt_ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr;
}

// gamma and beta in the one parameter dtype the kernels take (both float32 when the two were
// given in different dtypes).
struct NormParams {
  Tensor gamma, beta;
  DType dtype;
  NormParams(const OptTensor& g, const OptTensor& b, const Tensor& x) {
    const bool mixed = g.has_value() && b.has_value() && g->scalar_type() != b->scalar_type();
    if (g.has_value()) gamma = mixed ? g->to(at::kFloat) : *g;
    if (b.has_value()) beta = mixed ? b->to(at::kFloat) : *b;
    const Tensor& any = gamma.defined() ? gamma : beta;
    dtype = dtype_code(any.defined() ? any.scalar_type() : x.scalar_type());
  }
  // The gradient buffer of a parameter output in this dtype (the output itself when it matches).
  Tensor grad_buffer(const Tensor& out) const {
    if (out.numel() == 0 || dtype_code(out.scalar_type()) == dtype) return out;
    return new_tensor(out.sizes(), out.options().dtype(at::kFloat));  // params went float32
  }
};

// The width the norm works on: x's, or half of it for a gated input activation (x = [gate | up]).
int64_t norm_cols(const Tensor& x, Activation input_activation) {
  return is_gated(input_activation) ? x.size(1) / 2 : x.size(1);
}

}  // namespace

void run_norm_forward(const Tensor& x, const OptTensor& residual, double alpha,
                      const OptTensor& gamma, const OptTensor& beta, double eps, Norm norm,
                      Activation input_activation, const Tensor& y, const Tensor& sum,
                      const Tensor& mean, const Tensor& rstd, const Tensor& saved_mean,
                      const Tensor& saved_rstd) {
  const DeviceGuard guard(x.device());
  const NormParams params(gamma, beta, x);
  const int64_t cols = norm_cols(x, input_activation);
  NormForwardParams p;
  p.x = x.data_ptr();
  p.x_stride = x.size(1);
  if (residual.has_value()) {
    p.residual = residual->data_ptr();
    p.residual_stride = cols;
    p.alpha = static_cast<float>(alpha);
  }
  p.gamma = opt_ptr(params.gamma);
  p.beta = opt_ptr(params.beta);
  p.saved_mean = static_cast<const float*>(opt_ptr(saved_mean));
  p.saved_rstd = static_cast<const float*>(opt_ptr(saved_rstd));
  p.y = y.data_ptr();
  p.y_stride = cols;
  if (sum.defined()) {
    p.sum = sum.data_ptr();
    p.sum_stride = cols;
  }
  p.mean = opt_float_ptr(mean);
  p.rstd = opt_float_ptr(rstd);
  p.rows = x.size(0);
  p.cols = cols;
  p.eps = static_cast<float>(eps);
  p.norm = norm;
  p.input_activation = input_activation;
  p.dtype = dtype_code(x.scalar_type());
  p.param_dtype = params.dtype;
  check_status(norm_forward(p, current_stream(x)));
}

void run_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& gamma,
                       const OptTensor& beta, const Tensor& mean, const Tensor& rstd,
                       const OptTensor& grad_accum, Norm norm, Activation input_activation,
                       const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta) {
  const DeviceGuard guard(x.device());
  const NormParams params(gamma, beta, x);
  const Tensor dgamma_buf = params.grad_buffer(dgamma), dbeta_buf = params.grad_buffer(dbeta);
  const int64_t cols = norm_cols(x, input_activation);
  NormBackwardParams p;
  p.dy = dy.data_ptr();
  p.dy_stride = cols;
  p.x = x.data_ptr();
  p.x_stride = x.size(1);
  p.gamma = opt_ptr(params.gamma);
  p.mean = opt_float_ptr(mean);
  p.rstd = opt_float_ptr(rstd);
  if (grad_accum.has_value()) {
    p.grad_accum = grad_accum->data_ptr();
    p.grad_accum_stride = x.size(1);
  }
  if (dx.numel() > 0) {
    p.dx = dx.data_ptr();
    p.dx_stride = x.size(1);
  }
  p.dgamma = dgamma_buf.numel() > 0 ? dgamma_buf.data_ptr() : nullptr;
  p.dbeta = dbeta_buf.numel() > 0 ? dbeta_buf.data_ptr() : nullptr;
  p.rows = x.size(0);
  p.cols = cols;
  p.norm = norm;
  p.input_activation = input_activation;
  p.dtype = dtype_code(x.scalar_type());
  p.param_dtype = params.dtype;
  p.workspace_bytes = norm_backward_workspace_bytes(
      p.rows, p.cols, p.dtype, norm, input_activation, p.dgamma != nullptr, p.dbeta != nullptr);
  const Tensor ws = workspace(x, p.workspace_bytes);
  p.workspace = p.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
  check_status(norm_backward(p, current_stream(x)));
  if (!dgamma_buf.is_same(dgamma)) dgamma.copy_(dgamma_buf);
  if (!dbeta_buf.is_same(dbeta)) dbeta.copy_(dbeta_buf);
}

}  // namespace magneto::cuda
