// ln_linear on CUDA: our memory-bound kernels (csrc/cuda/kernels.h) around cuBLAS GEMMs
// (at::mm/addmm):
//
//   forward   h = N(in_act(x))                         norm_forward, in the weight's dtype
//             z = h @ weight^T                         cuBLAS (with the bias, addmm, when
//                                                      nothing follows)
//             out = alpha·residual + dropout(act(z + bias))   linear_epilogue, one pass
//   backward  dz = dy ⊙ keep/(1−p) ⊙ act'(preact), dbias = Σ dz   linear_epilogue_backward
//             dh = dz @ weight                         cuBLAS
//             dx, dgamma, dbeta from dh                norm_backward
//             h recomputed by norm_forward with the saved statistics: cuBLAS reads its
//             operands from memory, so h is written once more before the dweight GEMM
//             dweight = dz^T @ h                       cuBLAS
//
// h, dh are (rows, K) with K = weight.size(1); x and dx are (rows, 2K) for a gated input
// activation (x = [gate | up]), whose product act(gate)·up norm_forward and norm_backward
// recompute from x.
#include "cuda/launch_utils.h"
#include "cuda/ops.h"

namespace magneto::cuda {
namespace {

// The GEMM operand h = N(in_act(x)): (rows, K), K = weight.size(1) (x.size(1) / 2 when gated).
Tensor new_h(const Tensor& x, const Tensor& weight) {
  return new_tensor({x.size(0), weight.size(1)}, x.options());
}

}  // namespace

std::tuple<Tensor, Tensor> run_ln_linear(const Tensor& x, const OptTensor& ln_weight,
                                         const OptTensor& ln_bias, const Tensor& weight,
                                         const OptTensor& bias, const OptTensor& residual,
                                         const OptTensor& seed, double eps, Norm norm,
                                         Activation input_activation, Activation activation,
                                         double alpha, double dropout_p, const Tensor& mean,
                                         const Tensor& rstd) {
  const DeviceGuard guard(x.device());
  Tensor h = x;
  if (norm != Norm::kNone || input_activation != Activation::kNone) {
    h = new_h(x, weight);
    run_norm_forward(x, std::nullopt, 1.0, ln_weight, ln_bias, eps, norm, input_activation, h,
                     Tensor(), mean, rstd);
  }
  const Tensor wt = weight.t();
  if (activation == Activation::kNone && dropout_p == 0.0 && !residual.has_value()) {
    return {bias.has_value() ? at::addmm(*bias, h, wt) : at::mm(h, wt), empty0(x)};
  }
  // z = h W^T by cuBLAS; bias, activation, dropout and residual in one epilogue pass.
  Tensor z = at::mm(h, wt);
  const bool keep_preact = activation != Activation::kNone;
  Tensor preact = keep_preact ? new_like(z) : empty0(x);
  LinearEpilogueParams e;
  e.z = z.data_ptr();
  e.z_stride = z.size(1);
  e.z_dtype = dtype_code(z.scalar_type());
  e.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  if (residual.has_value()) {
    e.residual = residual->data_ptr();
    e.residual_stride = z.size(1);
    e.alpha = static_cast<float>(alpha);
  }
  if (dropout_p > 0.0) {
    e.seed = seed->data_ptr<int64_t>();
    e.dropout_threshold = dropout_threshold(dropout_p);
    e.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  e.out = z.data_ptr();  // in place
  e.out_stride = z.size(1);
  if (keep_preact) {
    e.preact = preact.data_ptr();
    e.preact_stride = z.size(1);
  }
  e.rows = z.size(0);
  e.cols = z.size(1);
  e.activation = activation;
  e.dtype = dtype_code(x.scalar_type());
  check_status(linear_epilogue(e, current_stream(x)));
  return {z, preact};
}

Tensor run_ln_linear_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& ln_weight,
                              const OptTensor& ln_bias, const Tensor& weight, const Tensor& mean,
                              const Tensor& rstd, const Tensor& preact, const OptTensor& seed,
                              Norm norm, Activation input_activation, Activation activation,
                              double dropout_p, Tensor dx, const Tensor& dgamma,
                              const Tensor& dbeta, Tensor dweight, Tensor dbias) {
  const DeviceGuard guard(x.device());
  const int64_t rows = x.size(0), out_features = weight.size(0);
  const bool dz_is_dy = activation == Activation::kNone && dropout_p == 0.0;
  Tensor dz = grad_out;
  if (!dz_is_dy) {
    dz = new_like(grad_out);
    LinearEpilogueBackwardParams g;
    g.dy = grad_out.data_ptr();
    g.dy_stride = out_features;
    if (activation != Activation::kNone) {
      g.preact = preact.data_ptr();
      g.preact_stride = out_features;
    }
    if (dropout_p > 0.0) {
      g.seed = seed->data_ptr<int64_t>();
      g.dropout_threshold = dropout_threshold(dropout_p);
      g.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
    }
    g.dz = dz.data_ptr();
    g.dz_stride = out_features;
    g.dbias = dbias.numel() > 0 ? dbias.data_ptr() : nullptr;
    g.rows = rows;
    g.cols = out_features;
    g.activation = activation;
    g.dtype = dtype_code(x.scalar_type());
    g.workspace_bytes = linear_epilogue_backward_workspace_bytes(
        rows, out_features, g.dtype, g.dbias != nullptr);
    const Tensor ws = workspace(x, g.workspace_bytes);
    g.workspace = g.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
    check_status(linear_epilogue_backward(g, current_stream(x)));
  } else if (dbias.numel() > 0) {
    at::sum_out(dbias, grad_out, {0});
  }
  const bool identity_prologue = norm == Norm::kNone && input_activation == Activation::kNone;
  const bool want_dx = dx.numel() > 0;
  const bool want_norm_grads = want_dx || dgamma.numel() > 0 || dbeta.numel() > 0;
  if (want_norm_grads) {
    Tensor dh = at::mm(dz, weight);
    if (identity_prologue) {
      dx = dh;
    } else {
      run_norm_backward(dh, x, ln_weight, ln_bias, mean, rstd, std::nullopt, norm,
                        input_activation, dx, dgamma, dbeta);
    }
  }
  if (dweight.numel() > 0) {
    Tensor h = x;
    if (!identity_prologue) {
      h = new_h(x, weight);
      run_norm_forward(x, std::nullopt, 1.0, ln_weight, ln_bias, 0.0, norm, input_activation, h,
                       Tensor(), Tensor(), Tensor(), mean, rstd);
    }
    at::mm_out(dweight, dz.t(), h);
  }
  return dx;
}

}  // namespace magneto::cuda
