// The CUDA backend (cuda::Kernels, csrc/backend.h): our memory-bound kernels (csrc/cuda/kernels.h)
// around cuBLAS GEMMs (at::mm/addmm), on the current stream of x's device. Compiled only in CUDA
// builds (MAGNETO_WITH_CUDA) and in the emulated one (csrc/cuda_emu).
//
//   norm ops  norm_forward (y, the sum with the residual, the statistics); norm_backward
//   ln_linear
//   forward   h = N(in_act(x))                         norm_forward, in the weight's dtype
//             preact = h @ weight^T                    cuBLAS (with the bias, addmm, when
//                                                      nothing follows)
//             out = alpha·residual + dropout(act(preact + bias))   linear_epilogue, one pass
//   backward  dz = dy ⊙ keep/(1−p) ⊙ act'(preact), dbias = Σ dz   linear_epilogue_backward
//             dh = dz @ weight                         cuBLAS
//             dx, dgamma, dbeta from dh                norm_backward
//             h recomputed by norm_forward with the saved statistics: cuBLAS reads its
//             operands from memory, so h is written once more before the dweight GEMM
//             dweight = dz^T @ h                       cuBLAS
//   dropout   linear_epilogue with dropout alone, x for the product
// BitNet's quantised projection (LnLinearArgs::quant; kernels.h and quant.cu):
//   offline  quantize_rows: h's int8 codes, their sum and scale (h never written); quant_linear:
//            the integer GEMM against the packed weight, its epilogue the scales, bias and
//            alpha·residual
//   online   quantize_rows writing the fake-quantised h and fake_quant_weight the fake weight
//            (WeightQuant), then the cuBLAS path above; backward straight-through: dh at the
//            fake weight, dweight at the fake h recomputed with the saved rstd
//
//   ln_linear_group (one norm, several weights W_i; quantised as ln_linear, h's rows once)
//   forward   h = N(x) once (norm_forward); out_i = h @ W_i^T + b_i   cuBLAS addmm per weight
//   backward  dbias_i = Σ dy_i; dh = Σ_i dy_i @ W_i (cuBLAS, accumulating in dh's dtype, x's as
//             ln_linear's); one norm_backward; h recomputed once; dweight_i = dy_i^T @ h
//
// h, dh are (rows, K) with K = weight.size(1); x and dx are (rows, 2K) for a gated input
// activation (x = [gate | up]), whose product act(gate)·up norm_forward and norm_backward
// recompute from x.
#include <ATen/record_function.h>

#include "backend.h"
#include "cuda/launch_utils.h"

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

// norm_forward, or with saved_mean/saved_rstd given the normalisation by those statistics
// instead of computed ones (the recompute of h in ln_linear's backward).
void norm_forward_with(const NormArgs& args, const NormOutputs& out,
                       const Tensor& saved_mean = Tensor(), const Tensor& saved_rstd = Tensor()) {
  const Tensor& x = args.x;
  const DeviceGuard guard(x.device());
  const NormParams params(args.gamma, args.beta, x);
  const int64_t cols = norm_cols(x, args.input_activation);
  NormForwardParams p;
  p.x = x.data_ptr();
  p.x_stride = x.size(1);
  if (args.residual.has_value()) {
    p.residual = args.residual->data_ptr();
    p.residual_stride = cols;
    p.alpha = static_cast<float>(args.alpha);
  }
  p.gamma = opt_ptr(params.gamma);
  p.beta = opt_ptr(params.beta);
  p.saved_mean = static_cast<const float*>(opt_ptr(saved_mean));
  p.saved_rstd = static_cast<const float*>(opt_ptr(saved_rstd));
  if (out.y.defined()) {
    p.y = out.y.data_ptr();
    p.y_stride = cols;
  }
  p.m2 = opt_float_ptr(out.m2);
  if (out.sum.defined()) {
    p.sum = out.sum.data_ptr();
    p.sum_stride = cols;
  }
  p.mean = opt_float_ptr(out.mean);
  p.rstd = opt_float_ptr(out.rstd);
  p.rows = x.size(0);
  p.cols = cols;
  p.eps = static_cast<float>(args.eps);
  p.norm = args.norm;
  p.input_activation = args.input_activation;
  p.dtype = dtype_code(x.scalar_type());
  p.param_dtype = params.dtype;
  {
    RECORD_FUNCTION(kNormForwardPass, {});
    check_status(cuda::norm_forward(p, current_stream(x)));
  }
}

// The GEMM operand h = N(in_act(x)): (rows, K), K = weight.size(1) (x.size(1) / 2 when gated).
Tensor new_h(const Tensor& x, const Tensor& weight) {
  return new_tensor({x.size(0), weight.size(1)}, x.options());
}

// quantize_rows (kernels.h) of h = N(in_act(x)), in_features wide: into q, q_sum and scale (the
// offline operand) when q is given, else into a new fake-quantised h, returned (online). rstd
// (kRms): written, or applied when `saved` (the backward's recompute, bitwise the forward's h;
// the sharded norm's). amax: the rows' max|h| given (tensor parallelism), else their own.
Tensor quantize_rows_of(const Tensor& x, const OptTensor& ln_weight, double eps, Norm norm,
                        Activation input_activation, int64_t in_features, const Tensor& rstd,
                        bool saved, const OptTensor& amax, const Tensor& q = Tensor(),
                        const Tensor& q_sum = Tensor(), const Tensor& scale = Tensor()) {
  const NormParams params(ln_weight, std::nullopt, x);
  QuantizeRowsParams p;
  p.x = x.data_ptr();
  p.x_stride = x.size(1);
  p.gamma = opt_ptr(params.gamma);
  float* r = norm == Norm::kRms ? opt_float_ptr(rstd) : nullptr;
  if (saved) {
    p.saved_rstd = r;
  } else {
    p.rstd = r;
  }
  p.amax = amax.has_value() ? amax->data_ptr<float>() : nullptr;
  Tensor fake;
  if (q.defined()) {
    p.q = q.data_ptr<int8_t>();
    p.q_sum = q_sum.data_ptr<int32_t>();
    p.scale = scale.data_ptr<float>();
  } else {
    fake = new_tensor({x.size(0), in_features}, x.options());
    p.fake = fake.data_ptr();
  }
  p.rows = x.size(0);
  p.cols = in_features;
  p.eps = static_cast<float>(eps);
  p.norm = norm;
  p.input_activation = input_activation;
  p.dtype = dtype_code(x.scalar_type());
  p.param_dtype = params.dtype;
  check_status(cuda::quantize_rows(p, current_stream(x)));
  return fake;
}

// The online mode's weight, fake-quantised per tensor (WeightQuant): at its own mean|W|, or at
// absmean (the whole weight's, given under tensor parallelism).
Tensor fake_quant_weight_of(const Tensor& weight, const OptTensor& absmean = std::nullopt) {
  const Tensor fake = new_like(weight);
  FakeQuantWeightParams p;
  p.weight = weight.data_ptr();
  p.absmean = absmean.has_value() ? absmean->data_ptr<float>() : nullptr;
  p.fake = fake.data_ptr();
  p.numel = weight.numel();
  p.workspace_bytes = absmean.has_value() ? 0 : fake_quant_weight_workspace_bytes(p.numel);
  const Tensor ws = workspace(weight, p.workspace_bytes);
  p.workspace = p.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
  p.dtype = dtype_code(weight.scalar_type());
  check_status(cuda::fake_quant_weight(p, current_stream(weight)));
  return fake;
}

// h's int8 rows (quantize_rows): codes, their sums and scales.
struct QuantizedRows {
  Tensor q, q_sum, scale;
};

QuantizedRows quantized_rows(const Tensor& x, int64_t in_features) {
  const int64_t rows = x.size(0);
  return {at::empty({rows, in_features}, x.options().dtype(at::kChar)),
          at::empty({rows}, x.options().dtype(at::kInt)),
          new_tensor({rows}, x.options().dtype(at::kFloat))};
}

// out = alpha·residual + the integer projection of the rows' codes against one packed weight.
// Into out where given (unit column stride, its row stride: a column range of a wider tensor),
// else into a new tensor.
Tensor quant_projection(const Tensor& x, Quant quant, const QuantizedRows& r,
                        const Tensor& weight, const float* weight_scale, const OptTensor& bias,
                        const OptTensor& residual, double alpha, Tensor out = Tensor()) {
  const int64_t rows = r.q.size(0);
  if (!out.defined()) out = new_tensor({rows, weight.size(0)}, x.options());
  QuantLinearParams l;
  l.q = r.q.data_ptr<int8_t>();
  l.q_sum = r.q_sum.data_ptr<int32_t>();
  l.scale = r.scale.data_ptr<float>();
  l.weight = weight.data_ptr<uint8_t>();
  l.weight_scale = weight_scale;
  l.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  if (residual.has_value()) {
    l.residual = residual->data_ptr();
    l.residual_stride = residual->size(1);
    l.alpha = static_cast<float>(alpha);
  }
  l.out = out.data_ptr();
  l.out_stride = out.stride(0);
  l.rows = rows;
  l.in_features = r.q.size(1);
  l.out_features = weight.size(0);
  l.quant = quant;
  l.dtype = dtype_code(x.scalar_type());
  check_status(cuda::quant_linear(l, current_stream(x)));
  return out;
}

// The offline modes: h's rows quantised, then their integer projection.
void offline_projection(const LnLinearArgs& a, LnLinearOutputs& out) {
  const Tensor& x = a.x;
  const int64_t in_features = norm_cols(x, a.input_activation);
  const QuantizedRows r = quantized_rows(x, in_features);
  quantize_rows_of(x, a.ln_weight, a.eps, a.norm, a.input_activation, in_features, out.rstd,
                   /*saved=*/a.given_rstd.has_value(), a.row_amax, r.q, r.q_sum, r.scale);
  out.out = quant_projection(x, a.quant, r, a.weight, a.weight_scale->data_ptr<float>(), a.bias,
                             a.residual, a.alpha);
  out.preact = empty0(x);
}

}  // namespace

void Kernels::norm_forward(const NormArgs& args, const NormOutputs& out) {
  norm_forward_with(args, out);
}

namespace {

// The norm backward; row_sums (defined): the sharded norm's row sums (kernels.h).
void norm_backward_with(const NormBackwardArgs& args, const NormGrads& grads,
                        const Tensor& row_sums = Tensor()) {
  const Tensor& x = args.x;
  const DeviceGuard guard(x.device());
  const NormParams params(args.gamma, args.beta, x);
  const Tensor dgamma_buf = params.grad_buffer(grads.dgamma);
  const Tensor dbeta_buf = params.grad_buffer(grads.dbeta);
  const int64_t cols = norm_cols(x, args.input_activation);
  NormBackwardParams p;
  p.dy = args.dy.data_ptr();
  p.dy_stride = cols;
  p.x = x.data_ptr();
  p.x_stride = x.size(1);
  p.gamma = opt_ptr(params.gamma);
  p.mean = opt_float_ptr(args.mean);
  p.rstd = opt_float_ptr(args.rstd);
  if (args.grad_accum.has_value()) {
    p.grad_accum = args.grad_accum->data_ptr();
    p.grad_accum_stride = x.size(1);
  }
  if (grads.dx.numel() > 0) {
    p.dx = grads.dx.data_ptr();
    p.dx_stride = x.size(1);
  }
  p.dgamma = dgamma_buf.numel() > 0 ? dgamma_buf.data_ptr() : nullptr;
  p.dbeta = dbeta_buf.numel() > 0 ? dbeta_buf.data_ptr() : nullptr;
  p.row_sums = opt_float_ptr(row_sums);
  p.row_means = args.row_means.has_value() ? args.row_means->data_ptr<float>() : nullptr;
  p.rows = x.size(0);
  p.cols = cols;
  p.norm = args.norm;
  p.input_activation = args.input_activation;
  p.dtype = dtype_code(x.scalar_type());
  p.param_dtype = params.dtype;
  p.workspace_bytes = norm_backward_workspace_bytes(p.rows, p.cols, p.dtype, p.input_activation,
                                                    p.dgamma != nullptr, p.dbeta != nullptr);
  const Tensor ws = workspace(x, p.workspace_bytes);
  p.workspace = p.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
  {
    RECORD_FUNCTION(kNormBackwardPass, {});
    check_status(cuda::norm_backward(p, current_stream(x)));
  }
  if (!dgamma_buf.is_same(grads.dgamma)) grads.dgamma.copy_(dgamma_buf);
  if (!dbeta_buf.is_same(grads.dbeta)) grads.dbeta.copy_(dbeta_buf);
}

}  // namespace

void Kernels::norm_backward(const NormBackwardArgs& args, const NormGrads& grads) {
  norm_backward_with(args, grads);
}

void Kernels::ln_linear(const LnLinearArgs& a, LnLinearOutputs& out) {
  const Tensor& x = a.x;
  const DeviceGuard guard(x.device());
  if (is_offline(a.quant)) {
    offline_projection(a, out);
    return;
  }
  const bool online = a.quant == Quant::kBitnetOnline;
  Tensor h = x;
  if (online) {
    h = quantize_rows_of(x, a.ln_weight, a.eps, a.norm, a.input_activation, a.weight.size(1),
                         out.rstd, /*saved=*/a.given_rstd.has_value(), a.row_amax);
  } else if (a.norm != Norm::kNone || a.input_activation != Activation::kNone) {
    h = new_h(x, a.weight);
    // Given statistics (the sharded norm's) normalise as the backward's recompute of h does.
    const bool given = a.given_rstd.has_value();
    norm_forward_with({x, std::nullopt, 1.0, a.ln_weight, a.ln_bias, a.eps, a.norm,
                       a.input_activation},
                      {h, Tensor(), given ? Tensor() : out.mean, given ? Tensor() : out.rstd},
                      given ? out.mean : Tensor(), given ? out.rstd : Tensor());
  }
  const Tensor wt = (online ? fake_quant_weight_of(a.weight, a.weight_scale) : a.weight).t();
  if (a.activation == Activation::kNone && a.dropout_p == 0.0 && !a.residual.has_value()) {
    out.out = a.bias.has_value() ? at::addmm(*a.bias, h, wt) : at::mm(h, wt);
    out.preact = empty0(x);
    return;
  }
  // h W^T by cuBLAS; bias, activation, dropout and residual in one epilogue pass, in place.
  out.out = at::mm(h, wt);
  const bool keep_preact = a.activation != Activation::kNone;
  out.preact = keep_preact ? new_like(out.out) : empty0(x);
  LinearEpilogueParams e;
  e.product = out.out.data_ptr();
  e.product_stride = out.out.size(1);
  e.product_dtype = dtype_code(out.out.scalar_type());
  e.bias = a.bias.has_value() ? a.bias->data_ptr() : nullptr;
  if (a.residual.has_value()) {
    e.residual = a.residual->data_ptr();
    e.residual_stride = out.out.size(1);
    e.alpha = static_cast<float>(a.alpha);
  }
  if (a.dropout_p > 0.0) {
    e.seed = a.seed->data_ptr<int64_t>();
    e.dropout_threshold = dropout_threshold(a.dropout_p);
    e.dropout_scale = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  }
  e.out = out.out.data_ptr();
  e.out_stride = out.out.size(1);
  if (keep_preact) {
    e.preact = out.preact.data_ptr();
    e.preact_stride = out.out.size(1);
  }
  e.rows = out.out.size(0);
  e.cols = out.out.size(1);
  e.activation = a.activation;
  e.dtype = dtype_code(x.scalar_type());
  check_status(linear_epilogue(e, current_stream(x)));
}

void Kernels::ln_linear_backward(const LnLinearBackwardArgs& a, LnLinearGrads& grads) {
  const Tensor& x = a.x;
  const DeviceGuard guard(x.device());
  const int64_t rows = x.size(0), out_features = a.weight.size(0);
  const bool dz_is_dy = a.activation == Activation::kNone && a.dropout_p == 0.0;
  Tensor dz = a.grad_out;
  if (!dz_is_dy) {
    dz = new_like(a.grad_out);
    LinearEpilogueBackwardParams g;
    g.dy = a.grad_out.data_ptr();
    g.dy_stride = out_features;
    if (a.activation != Activation::kNone) {
      g.preact = a.preact.data_ptr();
      g.preact_stride = out_features;
    }
    if (a.dropout_p > 0.0) {
      g.seed = a.seed->data_ptr<int64_t>();
      g.dropout_threshold = dropout_threshold(a.dropout_p);
      g.dropout_scale = static_cast<float>(1.0 / (1.0 - a.dropout_p));
    }
    g.dz = dz.data_ptr();
    g.dz_stride = out_features;
    g.dbias = grads.dbias.numel() > 0 ? grads.dbias.data_ptr() : nullptr;
    g.rows = rows;
    g.cols = out_features;
    g.activation = a.activation;
    g.dtype = dtype_code(x.scalar_type());
    g.workspace_bytes = linear_epilogue_backward_workspace_bytes(rows, out_features, g.dtype,
                                                                 g.dbias != nullptr);
    const Tensor ws = workspace(x, g.workspace_bytes);
    g.workspace = g.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
    check_status(linear_epilogue_backward(g, current_stream(x)));
  } else if (grads.dbias.numel() > 0) {
    at::sum_out(grads.dbias, a.grad_out, {0});
  }
  const bool identity_prologue =
      a.norm == Norm::kNone && a.input_activation == Activation::kNone;
  const bool want_dx = grads.dx.numel() > 0;
  // ln_linear_backward_partial: dh and the row sums (grads.dh, grads.row_sums) instead of the
  // norm's gradients.
  const bool partial = grads.dh.defined() && grads.dh.numel() > 0;
  const bool want_norm_grads =
      want_dx || grads.dln_weight.numel() > 0 || grads.dln_bias.numel() > 0 || partial;
  // Straight-through (online quant): the linear's gradients at the fake-quantised operands.
  const bool online = a.quant == Quant::kBitnetOnline;
  if (want_norm_grads) {
    const Tensor w = online ? fake_quant_weight_of(a.weight, a.weight_scale) : a.weight;
    Tensor dh = partial ? at::mm_out(grads.dh, dz, w) : at::mm(dz, w);
    if (identity_prologue) {
      grads.dx = dh;
    } else {
      norm_backward_with({dh, x, a.ln_weight, a.ln_bias, a.mean, a.rstd, std::nullopt, a.norm,
                          a.input_activation},
                         {grads.dx, grads.dln_weight, grads.dln_bias},
                         partial ? grads.row_sums : Tensor());
    }
  }
  if (grads.dweight.numel() > 0) {
    Tensor h = x;
    if (online) {
      h = quantize_rows_of(x, a.ln_weight, 0.0, a.norm, a.input_activation, a.weight.size(1),
                           a.rstd, /*saved=*/true, a.row_amax);
    } else if (!identity_prologue) {
      h = new_h(x, a.weight);
      norm_forward_with({x, std::nullopt, 1.0, a.ln_weight, a.ln_bias, 0.0, a.norm,
                         a.input_activation},
                        {h, Tensor(), Tensor(), Tensor()}, a.mean, a.rstd);
    }
    at::mm_out(grads.dweight, dz.t(), h);
  }
}

// The epilogue pass with dropout alone: x for the product (in its own dtype, so the
// pre-activation's rounding keeps it as it is), no bias, activation or residual.
void Kernels::dropout(const DropoutArgs& a, const Tensor& y) {
  const Tensor& x = a.x;
  const DeviceGuard guard(x.device());
  LinearEpilogueParams e;
  e.product = x.data_ptr();
  e.product_stride = x.size(1);
  e.product_dtype = dtype_code(x.scalar_type());
  e.seed = a.seed.data_ptr<int64_t>();
  e.dropout_threshold = dropout_threshold(a.p);
  e.dropout_scale = static_cast<float>(1.0 / (1.0 - a.p));
  e.out = y.data_ptr();
  e.out_stride = y.size(1);
  e.rows = x.size(0);
  e.cols = x.size(1);
  e.dtype = dtype_code(x.scalar_type());
  check_status(linear_epilogue(e, current_stream(x)));
}

void Kernels::ln_linear_group(const LnLinearGroupArgs& a, LnLinearGroupOutputs& out) {
  const Tensor& x = a.x;
  const DeviceGuard guard(x.device());
  const int64_t in_features = x.size(1);
  if (is_offline(a.quant)) {
    // The rows normalised and quantised once; every weight's projection reads their codes.
    const QuantizedRows r = quantized_rows(x, in_features);
    quantize_rows_of(x, a.ln_weight, a.eps, a.norm, Activation::kNone, in_features, out.rstd,
                     /*saved=*/false, std::nullopt, r.q, r.q_sum, r.scale);
    const float* scales = a.weight_scales->data_ptr<float>();
    const std::vector<Tensor> dests = group_outputs(a, out);
    for (size_t i = 0; i < a.weights.size(); ++i) {
      quant_projection(x, a.quant, r, a.weights[i], scales + i, a.biases[i], std::nullopt, 1.0,
                       dests[i]);
    }
    return;
  }
  const bool online = a.quant == Quant::kBitnetOnline;
  Tensor h = x;
  if (online) {  // h fake-quantised once, every weight fake-quantised (WeightQuant)
    h = quantize_rows_of(x, a.ln_weight, a.eps, a.norm, Activation::kNone, in_features, out.rstd,
                         /*saved=*/false, std::nullopt);
  } else if (a.norm != Norm::kNone) {
    h = new_h(x, a.weights[0]);
    norm_forward_with({x, std::nullopt, 1.0, a.ln_weight, a.ln_bias, a.eps, a.norm},
                      {h, Tensor(), out.mean, out.rstd});
  }
  // Each projection into its destination (a column range of the concat output: the GEMM's ldc).
  const std::vector<Tensor> dests = group_outputs(a, out);
  for (size_t i = 0; i < a.weights.size(); ++i) {
    const Tensor wt = (online ? fake_quant_weight_of(a.weights[i]) : a.weights[i]).t();
    Tensor dest = dests[i];
    a.biases[i].has_value() ? at::addmm_out(dest, *a.biases[i], h, wt) : at::mm_out(dest, h, wt);
  }
}

void Kernels::ln_linear_group_backward(const LnLinearGroupBackwardArgs& a,
                                       LnLinearGroupGrads& grads) {
  const Tensor& x = a.x;
  const DeviceGuard guard(x.device());
  const size_t n = a.weights.size();
  for (size_t i = 0; i < n; ++i) {
    if (grads.dbiases[i].numel() == 0) continue;
    if (a.grad_outs[i].defined()) {
      at::sum_out(grads.dbiases[i], a.grad_outs[i], {0});
    } else {
      grads.dbiases[i].zero_();
    }
  }
  const bool identity_prologue = a.norm == Norm::kNone;
  const bool want_norm_grads =
      grads.dx.numel() > 0 || grads.dln_weight.numel() > 0 || grads.dln_bias.numel() > 0;
  // Straight-through (online quant): the linear's gradients at the fake-quantised operands.
  const bool online = a.quant == Quant::kBitnetOnline;
  if (want_norm_grads) {
    Tensor dh = at::zeros_like(x);
    for (size_t i = 0; i < n; ++i) {
      if (!a.grad_outs[i].defined()) continue;
      dh.addmm_(a.grad_outs[i], online ? fake_quant_weight_of(a.weights[i]) : a.weights[i]);
    }
    if (identity_prologue) {
      grads.dx = dh;
    } else {
      Kernels::norm_backward({dh, x, a.ln_weight, a.ln_bias, a.mean, a.rstd, std::nullopt,
                              a.norm},
                             {grads.dx, grads.dln_weight, grads.dln_bias});
    }
  }
  Tensor h;
  for (size_t i = 0; i < n; ++i) {
    if (grads.dweights[i].numel() == 0) continue;
    if (!a.grad_outs[i].defined()) {
      grads.dweights[i].zero_();
      continue;
    }
    if (!h.defined()) {  // h recomputed once, for every weight's gradient
      h = x;
      if (online) {
        h = quantize_rows_of(x, a.ln_weight, 0.0, a.norm, Activation::kNone, x.size(1), a.rstd,
                             /*saved=*/true, std::nullopt);
      } else if (!identity_prologue) {
        h = new_h(x, a.weights[0]);
        norm_forward_with({x, std::nullopt, 1.0, a.ln_weight, a.ln_bias, 0.0, a.norm},
                          {h, Tensor(), Tensor(), Tensor()}, a.mean, a.rstd);
      }
    }
    at::mm_out(grads.dweights[i], a.grad_outs[i].t(), h);
  }
}

}  // namespace magneto::cuda
