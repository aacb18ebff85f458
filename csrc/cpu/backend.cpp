// The CPU backend (cpu::Kernels, csrc/backend.h): our memory-bound passes (csrc/cpu/kernels.h)
// around the GEMMs of the CPU GEMM engine (csrc/cpu/gemm.h: torch's at::mm / at::addmm or its
// oneDNN linear, whichever measures faster, and our few-row kernel):
//
//   norm ops  one norm pass over x (y, the sum with the residual, the statistics); backward one
//             pass over x and dy
//   ln_linear
//   forward   h = N(in_act(x))                         one pass over x (rows, stats)
//             preact = h @ weight^T + bias             (gemm::linear)
//             out = alpha·residual + dropout(act(preact))   one pass over preact, in place
//                                                      unless preact is kept (no pass without
//                                                      residual, act and dropout)
//             (an h larger than the workspace goes in row blocks, each GEMM accumulating into
//             out = alpha·residual + bias when nothing else follows)
//   backward  dz = dy ⊙ keep/(1−p) ⊙ act'(preact), dbias = Σ dz   one pass over dy (skipped,
//                                                      bar the dbias sum, when dz = dy)
//             dh = dz @ weight
//             one pass over x: dx = norm backward of dh ⊙ in_act'(x), dgamma/dbeta partials,
//                              and h recomputed from the saved stats (the sweep already reads x)
//             dweight = dz^T @ h                       (a new tensor: the engine's own output)
//   dropout   the epilogue pass with dropout alone, x for preact
// BitNet's quantised projection (LnLinearArgs::quant): online, the same passes with the weight
// and h fake-quantised (transformers' WeightQuant / ActQuant, straight-through backward, which
// quantises the recomputed h again for dweight); offline, h's rows quantised to int8 once and
// dotted against the packed weight (quantize_rows, quant_linear), then the same output pass.
//   ln_linear_group (one norm, several weights W_i)
//   forward   per block of rows: h = N(x) once, then out_i = h @ W_i^T + b_i for every weight
//   backward  dbias_i = Σ dy_i; dh = Σ_i dy_i @ W_i (accumulated by the GEMMs in x's dtype, as
//             ln_linear's dh); one pass over x: norm backward of dh and h recomputed;
//             dweight_i = dy_i^T @ h
//   quantised as ln_linear's, h fake-quantised (online) or int8 rows (offline) once for all W_i
// A gated input activation makes x 2·K wide (x = [gate | up]); h, dh, the norm and the GEMMs
// stay K wide, and only the norm passes read x (and write dx) at 2·K.
#include <algorithm>
#include <cstdlib>
#include <memory>

#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include "backend.h"
#include "cpu/fake_quant.h"
#include "cpu/gemm.h"
#include "cpu/kernels.h"

namespace magneto::cpu {
namespace {

// The norm's width: x's, or half of it for a gated input activation (x = [gate | up]).
int64_t norm_cols(const Tensor& x, Activation input_activation) {
  return is_gated(input_activation) ? x.size(1) / 2 : x.size(1);
}

// Norm parameters (contiguous, checks.cpp) as float32 pointers for the kernels, which take one
// parameter type: the parameter itself, or a float32 copy of a bf16/fp16 one, converted here
// rather than by a dispatched .to() (an op and a tensor a parameter: more than a one-row norm's
// own time).
struct ParamF32 {
  std::unique_ptr<float[]> copy;
  const float* p = nullptr;
  explicit ParamF32(const OptTensor& t) {
    if (!t.has_value()) return;
    if (t->scalar_type() == at::kFloat) {
      p = t->data_ptr<float>();
      return;
    }
    const int64_t n = t->numel();
    copy = std::make_unique_for_overwrite<float[]>(n);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(t->scalar_type(), "ParamF32", [&] {
      const scalar_t* src = t->data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) copy[i] = static_cast<float>(src[i]);
    });
    p = copy.get();
  }
  const float* ptr() const { return p; }
};

// The norm backward (args.dy defined) into grads, and/or the recompute of h = N(in_act(x)) from
// the saved statistics (h defined), in one sweep over x; row_sums (defined): the sharded norm's
// partial row sums (kernels.h, NormBackward).
void norm_backward_and_h(const NormBackwardArgs& args, const NormGrads& grads, const Tensor& h,
                         const Tensor& row_sums = Tensor()) {
  const Tensor& x = args.x;
  const ParamF32 g(args.gamma), b(args.beta);
  const Tensor dgamma32 = grads.dgamma.numel() > 0 ? grad_f32(grads.dgamma) : Tensor();
  const Tensor dbeta32 = grads.dbeta.numel() > 0 ? grad_f32(grads.dbeta) : Tensor();
  NormBackward a;
  a.dtype = dtype_code(x.scalar_type());
  a.norm = args.norm;
  a.input_activation = args.input_activation;
  a.rows = x.size(0);
  a.cols = norm_cols(x, args.input_activation);
  if (args.dy.defined()) {
    a.dy = args.dy.data_ptr();
    a.dy_stride = a.cols;
  }
  a.x = x.data_ptr();
  a.x_stride = x.size(1);
  a.mean = opt_float_ptr(args.mean);
  a.rstd = opt_float_ptr(args.rstd);
  a.gamma = g.ptr();
  a.beta = b.ptr();
  if (args.grad_accum.has_value()) {
    a.grad_accum = args.grad_accum->data_ptr();
    a.grad_accum_stride = x.size(1);
  }
  if (grads.dx.numel() > 0) {
    a.dx = grads.dx.data_ptr();
    a.dx_stride = x.size(1);
  }
  a.dgamma = dgamma32.defined() ? dgamma32.data_ptr<float>() : nullptr;
  a.dbeta = dbeta32.defined() ? dbeta32.data_ptr<float>() : nullptr;
  if (h.defined()) {
    a.h = h.data_ptr();
    a.h_stride = a.cols;
  }
  a.row_sums = opt_float_ptr(row_sums);
  a.row_means = args.row_means.has_value() ? args.row_means->data_ptr<float>() : nullptr;
  RECORD_FUNCTION(kNormBackwardPass, {});
  norm_backward(a);
  if (dgamma32.defined()) copy_back(grads.dgamma, dgamma32);
  if (dbeta32.defined()) copy_back(grads.dbeta, dbeta32);
}

// The GEMM operand h = N(in_act(x)), recomputed in the forward and the backward and dropped after
// its GEMM, lives in a per-thread workspace kept between calls (a fresh M×K tensor per call goes
// back to the OS on free and faults in again), of at most MAGNETO_CPU_WORKSPACE_MB (64) MiB. A
// larger h goes through it in row blocks of at least kMinBlockRows (smaller blocks slow the
// GEMMs: docs/design.md, Decisions), else (and a backward's h) is allocated per call (0: always).
constexpr int64_t kMinBlockRows = 256;
// Blocks of h for the offline projection, quantised right after the norm: they stay in L2.
constexpr int64_t kQuantBlockBytes = 256 << 10;

int64_t workspace_limit_bytes() {
  static const int64_t limit = [] {
    const char* env = std::getenv("MAGNETO_CPU_WORKSPACE_MB");
    const long long mb = env != nullptr ? std::atoll(env) : 64;
    TORCH_CHECK_VALUE(mb >= 0, "MAGNETO_CPU_WORKSPACE_MB must be >= 0, got ", env);
    return static_cast<int64_t>(mb) << 20;
  }();
  return limit;
}

// The rows of `cols` elements of x's dtype to put through the workspace at a time: all `rows`
// when they fit, else as many as fit if that is at least min_rows, else 0 (do not use it).
int64_t workspace_block_rows(const Tensor& x, int64_t rows, int64_t cols, int64_t min_rows) {
  const int64_t row_bytes = std::max<int64_t>(1, cols * static_cast<int64_t>(x.element_size()));
  const int64_t fit = workspace_limit_bytes() / row_bytes;
  if (fit >= rows) return rows;
  return fit >= min_rows ? fit : 0;
}

// A rows×cols tensor like x in this thread's workspace (grown as needed, up to the limit);
// valid until the next call on this thread. Operands used together are row ranges of one.
// from_blob, not narrow/view of the buffer: one TensorImpl instead of three dispatched view ops
// (docs/design.md, Decisions).
Tensor workspace(const Tensor& x, int64_t rows, int64_t cols) {
  thread_local Tensor buffer;
  const int64_t bytes = rows * cols * static_cast<int64_t>(x.element_size());
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = Tensor();  // free the old one first
    buffer = at::empty({bytes}, x.options().dtype(at::kByte));
  }
  Tensor view = at::from_blob(buffer.data_ptr(), {rows, cols}, x.options());
  if (poison_outputs.load(std::memory_order_relaxed)) view.fill_(NAN);
  return view;
}

// Rows [begin, begin + count) of a per-row tensor; empty tensors (absent stats) stay empty.
Tensor row_slice(const Tensor& t, int64_t begin, int64_t count) {
  return t.numel() == 0 ? t : t.narrow(0, begin, count);
}

// The CPU kernels draw the mask from the seed's value (the CUDA ones read it on the device).
uint64_t seed_value(const OptTensor& seed, double p) {
  return p > 0.0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

// ln_linear's prologue h = N(in_act(x)) for rows of x, into h, with their statistics; with
// given statistics (mean and rstd hold them), the normalisation by those, as the backward's
// recompute of h.
void prologue(const LnLinearArgs& a, const Tensor& x, const Tensor& h, const Tensor& mean,
              const Tensor& rstd) {
  if (a.given_rstd.has_value()) {
    norm_backward_and_h({Tensor(), x, a.ln_weight, a.ln_bias, mean, rstd, std::nullopt, a.norm,
                         a.input_activation},
                        {empty0(x), empty0(x), empty0(x)}, h);
    return;
  }
  Kernels::norm_forward({x, std::nullopt, 1.0, a.ln_weight, a.ln_bias, a.eps, a.norm,
                         a.input_activation},
                        {h, Tensor(), mean, rstd});
}

// Rows [begin, begin + count) of an optional per-row tensor (undefined when absent).
Tensor opt_rows(const OptTensor& t, int64_t begin, int64_t count) {
  return t.has_value() ? t->narrow(0, begin, count) : Tensor();
}

// h's int8 rows (kernels.h, quantize_rows): codes, their sums and scales.
struct QuantizedRows { Tensor q, q_sum, scale; };

// The offline modes' operand: h = N(in_act(x)) a block of rows at a time into a cache-sized
// workspace, each block quantised right after (the full-precision h is never all in memory).
QuantizedRows quantize_h(const LnLinearArgs& a, const Tensor& mean, const Tensor& rstd) {
  const Tensor& x = a.x;
  const int64_t rows = x.size(0), in_features = norm_cols(x, a.input_activation);
  const QuantizedRows r{at::empty({rows, in_features}, x.options().dtype(at::kChar)),
                        at::empty({rows}, x.options().dtype(at::kInt)),
                        at::empty({rows}, x.options().dtype(at::kFloat))};
  const bool identity = a.norm == Norm::kNone && a.input_activation == Activation::kNone;
  const int64_t block =
      identity ? rows : std::max<int64_t>(1, kQuantBlockBytes / (in_features * x.element_size()));
  for (int64_t begin = 0; begin < rows; begin += block) {
    const int64_t count = std::min(block, rows - begin);
    Tensor h = x.narrow(0, begin, count);
    if (!identity) {
      h = workspace_block_rows(x, count, in_features, count) == count
              ? workspace(x, count, in_features)
              : new_tensor({count, in_features}, x.options());
      prologue(a, x.narrow(0, begin, count), h, row_slice(mean, begin, count),
               row_slice(rstd, begin, count));
    }
    if (a.row_amax.has_value()) {
      quantize_rows_given(h, a.row_amax->narrow(0, begin, count), r.q.narrow(0, begin, count),
                          r.q_sum.narrow(0, begin, count), r.scale.narrow(0, begin, count));
      continue;
    }
    quantize_rows({dtype_code(x.scalar_type()), count, in_features, h.data_ptr(),
                   r.q.data_ptr<int8_t>() + begin * in_features,
                   r.q_sum.data_ptr<int32_t>() + begin, r.scale.data_ptr<float>() + begin});
  }
  return r;
}

// The integer projection (kernels.h, quant_linear) of quantised rows against one packed weight.
// preact (rows, out_features) = the projection; a column range of a wider tensor is written in
// place, with its row stride.
void quant_projection(const Tensor& x, Quant quant, const QuantizedRows& r, const Tensor& weight,
                      float weight_scale, const OptTensor& bias, const Tensor& preact) {
  quant_linear({dtype_code(x.scalar_type()), quant, r.q.size(0), r.q.size(1), weight.size(0),
                r.q.data_ptr<int8_t>(), r.q_sum.data_ptr<int32_t>(), r.scale.data_ptr<float>(),
                weight.data_ptr<uint8_t>(), weight_scale,
                bias.has_value() ? bias->data_ptr() : nullptr, preact.data_ptr(),
                preact.stride(0)});
}

}  // namespace

void Kernels::norm_forward(const NormArgs& args, const NormOutputs& out) {
  const Tensor& x = args.x;
  const ParamF32 g(args.gamma), b(args.beta);
  NormForward a;
  a.dtype = dtype_code(x.scalar_type());
  a.norm = args.norm;
  a.input_activation = args.input_activation;
  a.rows = x.size(0);
  a.cols = norm_cols(x, args.input_activation);
  a.x = x.data_ptr();
  a.x_stride = x.size(1);
  if (args.residual.has_value()) {
    a.residual = args.residual->data_ptr();
    a.residual_stride = a.cols;
    a.alpha = static_cast<float>(args.alpha);
  }
  a.gamma = g.ptr();
  a.beta = b.ptr();
  a.eps = static_cast<float>(args.eps);
  if (out.y.defined()) {
    a.y = out.y.data_ptr();
    a.y_stride = a.cols;
  }
  if (out.sum.defined()) {
    a.sum = out.sum.data_ptr();
    a.sum_stride = a.cols;
  }
  a.mean = opt_float_ptr(out.mean);
  a.rstd = opt_float_ptr(out.rstd);
  a.m2 = opt_float_ptr(out.m2);
  RECORD_FUNCTION(kNormForwardPass, {});
  cpu::norm_forward(a);
}

void Kernels::norm_backward(const NormBackwardArgs& args, const NormGrads& grads) {
  norm_backward_and_h(args, grads, Tensor());
}

void Kernels::ln_linear(const LnLinearArgs& a, LnLinearOutputs& out) {
  const Tensor& x = a.x;
  // in_features: the GEMM's K, x's width or half of it for a gated input activation.
  const int64_t rows = x.size(0), in_features = a.weight.size(1), cols = a.weight.size(0);
  const DType dtype = dtype_code(x.scalar_type());
  const bool identity_prologue =
      a.norm == Norm::kNone && a.input_activation == Activation::kNone;
  // h in blocks of `block` rows through the workspace, or (block_rows 0) all at once, allocated.
  const int64_t block_rows = workspace_block_rows(x, rows, in_features, kMinBlockRows);
  const int64_t block = block_rows > 0 ? block_rows : rows;
  auto operand = [&](int64_t count) {
    return block_rows > 0 ? workspace(x, count, in_features)
                          : new_tensor({count, in_features}, x.options());
  };
  const bool online = a.quant == Quant::kBitnetOnline;
  const Tensor weight = online ? fake_quant_weight(a.weight, a.weight_scale) : a.weight;
  Tensor preact;
  bool residual_added = false;
  if (is_offline(a.quant)) {
    preact = new_tensor({rows, cols}, x.options());
    quant_projection(x, a.quant, quantize_h(a, out.mean, out.rstd), a.weight,
                     a.weight_scale->item<float>(), a.bias, preact);
  } else if (identity_prologue || block == rows) {
    // One GEMM with the bias in its epilogue: preact = h W^T + b. The residual comes in the pass
    // over preact below: accumulating into an output filled with alpha·residual + b instead
    // makes the GEMM read it, which costs more than the extra pass (docs/design.md, Decisions).
    Tensor h = x;
    if (!identity_prologue) {
      h = operand(rows);
      prologue(a, x, h, out.mean, out.rstd);
    }
    if (online) h = fake_quant_rows(h, !identity_prologue, opt_rows(a.row_amax, 0, rows));
    preact = gemm::linear(h, weight, a.bias);
  } else {
    // h = N(in_act(x)) block by block, each block followed by its GEMM, accumulating into
    // preact = alpha·residual + bias (either optional; the residual only when nothing follows
    // the GEMM), written in one pass.
    residual_added =
        a.activation == Activation::kNone && a.dropout_p == 0.0 && a.residual.has_value();
    preact = new_tensor({rows, cols}, x.options());
    const bool init = residual_added || a.bias.has_value();
    if (init) {
      residual_bias_init(dtype, rows, cols, residual_added ? a.residual->data_ptr() : nullptr,
                         cols, static_cast<float>(a.alpha),
                         a.bias.has_value() ? a.bias->data_ptr() : nullptr, preact.data_ptr(),
                         cols);
    }
    const Tensor wt = weight.t();
    for (int64_t begin = 0; begin < rows; begin += block) {
      const int64_t count = std::min(block, rows - begin);
      const Tensor h = operand(count);
      prologue(a, x.narrow(0, begin, count), h, row_slice(out.mean, begin, count),
               row_slice(out.rstd, begin, count));
      if (online) fake_quant_rows(h, /*in_place=*/true, opt_rows(a.row_amax, begin, count));
      gemm::matmul(gemm::Role::kForward, h, wt, preact.narrow(0, begin, count),
                   /*accumulate=*/init);
    }
  }
  const bool pass_needed = a.activation != Activation::kNone || a.dropout_p > 0.0 ||
                           (a.residual.has_value() && !residual_added);
  if (!pass_needed) {
    out.out = preact;
    out.preact = empty0(x);
    return;
  }
  // Activation, dropout and residual in one pass over preact (in place unless preact is kept for
  // the backward).
  const bool keep_preact = a.activation != Activation::kNone;
  out.out = keep_preact ? new_like(preact) : preact;
  out.preact = keep_preact ? preact : empty0(x);
  LinearEpilogue e;
  e.dtype = dtype;
  e.activation = a.activation;
  e.rows = rows;
  e.cols = cols;
  e.preact = preact.data_ptr();
  e.preact_stride = cols;
  if (a.residual.has_value()) {
    e.residual = a.residual->data_ptr();
    e.residual_stride = cols;
    e.alpha = static_cast<float>(a.alpha);
  }
  e.seed = seed_value(a.seed, a.dropout_p);
  e.dropout_p = a.dropout_p;
  e.out = out.out.data_ptr();
  e.out_stride = cols;
  linear_epilogue(e);
}

// A backward's rows x in_features buffers (dh's, h's): `count` row ranges of the workspace when
// they all fit (see workspace()), else each allocated.
class BackwardBuffers {
 public:
  BackwardBuffers(const Tensor& x, int64_t rows, int64_t in_features, int64_t count)
      : x_(x), rows_(rows), in_features_(in_features) {
    fits_ = count > 0 &&
            workspace_block_rows(x, count * rows, in_features, count * rows) == count * rows;
    if (fits_) space_ = workspace(x, count * rows, in_features);
  }
  Tensor operator()(int64_t index) const {
    return fits_ ? space_.narrow(0, index * rows_, rows_)
                 : new_tensor({rows_, in_features_}, x_.options());
  }

 private:
  const Tensor& x_;
  int64_t rows_, in_features_;
  bool fits_ = false;
  Tensor space_;
};

void Kernels::ln_linear_backward(const LnLinearBackwardArgs& a, LnLinearGrads& grads) {
  const Tensor& x = a.x;
  const int64_t rows = x.size(0), out_features = a.weight.size(0);
  // dz = dy ⊙ keep/(1−p) ⊙ act'(preact), with dbias = Σ_rows dz in the same pass.
  const bool dz_is_dy = a.activation == Activation::kNone && a.dropout_p == 0.0;
  Tensor dz = dz_is_dy ? a.grad_out : new_like(a.grad_out);
  const Tensor dbias32 = grads.dbias.numel() > 0 ? grad_f32(grads.dbias) : Tensor();
  if (!dz_is_dy || dbias32.defined()) {
    LinearEpilogueBackward g;
    g.dtype = dtype_code(x.scalar_type());
    g.activation = a.activation;
    g.rows = rows;
    g.cols = out_features;
    g.dy = a.grad_out.data_ptr();
    g.dy_stride = out_features;
    if (a.activation != Activation::kNone) {
      g.preact = a.preact.data_ptr();
      g.preact_stride = out_features;
    }
    g.seed = seed_value(a.seed, a.dropout_p);
    g.dropout_p = a.dropout_p;
    if (!dz_is_dy) {
      g.dz = dz.data_ptr();
      g.dz_stride = out_features;
    }
    g.dbias = dbias32.defined() ? dbias32.data_ptr<float>() : nullptr;
    linear_epilogue_backward(g);
    if (dbias32.defined()) copy_back(grads.dbias, dbias32);
  }
  // dh = dz @ weight, then one pass over x for the norm backward and for the recompute of h. dh
  // goes straight into dx when dx is wanted and as wide, and the norm backward turns it into dx
  // in place, row by row: no M×K buffer for dh. A gated dx is 2·K wide: dh gets its own buffer.
  const int64_t in_features = a.weight.size(1);
  const bool identity_prologue =
      a.norm == Norm::kNone && a.input_activation == Activation::kNone;
  const bool want_dx = grads.dx.numel() > 0;
  // ln_linear_backward_partial: dh and the row sums (into grads.dh, grads.row_sums) stand for
  // the norm's gradients.
  const bool partial = grads.dh.defined() && grads.dh.numel() > 0;
  const bool want_norm_grads =
      want_dx || grads.dln_weight.numel() > 0 || grads.dln_bias.numel() > 0 || partial;
  const bool want_dweight = grads.dweight.numel() > 0;
  const bool dh_in_dx = want_dx && !is_gated(a.input_activation);
  const bool dh_buffer = want_norm_grads && !dh_in_dx && !partial;
  const bool h_buffer = want_dweight && !identity_prologue;
  const BackwardBuffers buffer(x, rows, in_features, int64_t{dh_buffer} + int64_t{h_buffer});
  // Straight-through (online quant): the linear's gradients at the fake-quantised operands.
  const bool online = a.quant == Quant::kBitnetOnline;
  Tensor dh;
  if (want_norm_grads) {
    dh = partial ? grads.dh : dh_in_dx ? grads.dx : buffer(0);
    gemm::matmul(gemm::Role::kInputGrad, dz,
                 online ? fake_quant_weight(a.weight, a.weight_scale) : a.weight, dh,
                 /*accumulate=*/false);
  }
  Tensor h;  // the GEMM operand of dweight
  if (want_dweight) h = identity_prologue ? x : buffer(int64_t{dh_buffer});
  if (identity_prologue && want_dx) {
    // N and in_act are the identity: dx = dh, already in place
  } else if (want_norm_grads || (want_dweight && !identity_prologue)) {
    norm_backward_and_h({dh, x, a.ln_weight, a.ln_bias, a.mean, a.rstd, std::nullopt, a.norm,
                         a.input_activation},
                        {grads.dx, grads.dln_weight, grads.dln_bias},
                        identity_prologue ? Tensor() : h, partial ? grads.row_sums : Tensor());
  }
  if (want_dweight && online) {
    h = fake_quant_rows(h, !identity_prologue, opt_rows(a.row_amax, 0, rows));
  }
  if (want_dweight) {  // a new tensor: oneDNN's own output, not copied into the one given
    grads.dweight = gemm::matmul(gemm::Role::kWeightGrad, dz.t(), h, Tensor(), false);
  }
}

// The epilogue pass with nothing but dropout: preact = x, no activation, no residual.
void Kernels::dropout(const DropoutArgs& a, const Tensor& y) {
  LinearEpilogue e;
  e.dtype = dtype_code(a.x.scalar_type());
  e.rows = a.x.size(0);
  e.cols = a.x.size(1);
  e.preact = a.x.data_ptr();
  e.preact_stride = e.cols;
  e.seed = static_cast<uint64_t>(a.seed.item<int64_t>());
  e.dropout_p = a.p;
  e.out = y.data_ptr();
  e.out_stride = e.cols;
  linear_epilogue(e);
}

void Kernels::ln_linear_group(const LnLinearGroupArgs& a, LnLinearGroupOutputs& out) {
  const Tensor& x = a.x;
  const int64_t rows = x.size(0), in_features = x.size(1);
  const bool identity_prologue = a.norm == Norm::kNone;
  const LnLinearArgs norm_args{x, a.ln_weight, a.ln_bias, Tensor(), std::nullopt, std::nullopt,
                               std::nullopt, a.eps, a.norm};
  if (is_offline(a.quant)) {  // the rows quantised once, every weight's projection reading them
    const QuantizedRows r = quantize_h(norm_args, out.mean, out.rstd);
    const float* scales = a.weight_scales->data_ptr<float>();
    const std::vector<Tensor> dests = group_outputs(a, out);
    for (size_t i = 0; i < a.weights.size(); ++i) {
      quant_projection(x, a.quant, r, a.weights[i], scales[i], a.biases[i], dests[i]);
    }
    return;
  }
  // Online: every weight fake-quantised, and h once, after the norm (straight-through backward).
  const bool online = a.quant == Quant::kBitnetOnline;
  std::vector<Tensor> weights;
  for (const Tensor& w : a.weights) weights.push_back(online ? fake_quant_weight(w) : w);
  const int64_t block_rows = workspace_block_rows(x, rows, in_features, kMinBlockRows);
  const bool at_once = identity_prologue || block_rows == 0 || block_rows == rows;
  Tensor h = x;  // h at once: x itself without a norm
  if (at_once && !identity_prologue) {
    h = block_rows > 0 ? workspace(x, rows, in_features)
                       : new_tensor({rows, in_features}, x.options());
    prologue(norm_args, x, h, out.mean, out.rstd);
  }
  if (at_once && online) h = fake_quant_rows(h, !identity_prologue);
  if (at_once) {  // one GEMM per weight with its bias in the epilogue, into its destination
    if (!a.concat) {
      for (size_t i = 0; i < weights.size(); ++i) {
        out.outs.push_back(gemm::linear(h, weights[i], a.biases[i]));
      }
      return;
    }
    const std::vector<Tensor> dests = group_outputs(a, out);
    for (size_t i = 0; i < weights.size(); ++i) gemm::linear(h, weights[i], a.biases[i], dests[i]);
    return;
  }
  // h block by block through the workspace, each block followed by every weight's GEMM,
  // accumulating into destinations (column ranges of the concat output) that start as the bias.
  const DType dtype = dtype_code(x.scalar_type());
  const std::vector<Tensor> dests = group_outputs(a, out);
  for (size_t i = 0; i < a.weights.size(); ++i) {
    if (a.biases[i].has_value()) {
      residual_bias_init(dtype, rows, dests[i].size(1), nullptr, 0, 1.0f,
                         a.biases[i]->data_ptr(), dests[i].data_ptr(), dests[i].stride(0));
    }
  }
  for (int64_t begin = 0; begin < rows; begin += block_rows) {
    const int64_t count = std::min(block_rows, rows - begin);
    const Tensor h_block = workspace(x, count, in_features);
    prologue(norm_args, x.narrow(0, begin, count), h_block, row_slice(out.mean, begin, count),
             row_slice(out.rstd, begin, count));
    if (online) fake_quant_rows(h_block, /*in_place=*/true);
    for (size_t i = 0; i < weights.size(); ++i) {
      gemm::matmul(gemm::Role::kForward, h_block, weights[i].t(), dests[i].narrow(0, begin, count),
                   /*accumulate=*/a.biases[i].has_value());
    }
  }
}

void Kernels::ln_linear_group_backward(const LnLinearGroupBackwardArgs& a,
                                       LnLinearGroupGrads& grads) {
  const Tensor& x = a.x;
  const int64_t rows = x.size(0), in_features = x.size(1);
  const size_t n = a.weights.size();
  for (size_t i = 0; i < n; ++i) {
    if (grads.dbiases[i].numel() == 0) continue;
    if (!a.grad_outs[i].defined()) {
      grads.dbiases[i].zero_();
      continue;
    }
    const Tensor dbias32 = grad_f32(grads.dbiases[i]);
    LinearEpilogueBackward g;  // dz = dy: only the column sum
    g.dtype = dtype_code(x.scalar_type());
    g.rows = rows;
    g.cols = a.weights[i].size(0);
    g.dy = a.grad_outs[i].data_ptr();
    g.dy_stride = a.grad_outs[i].stride(0);
    g.dbias = dbias32.data_ptr<float>();
    linear_epilogue_backward(g);
    copy_back(grads.dbiases[i], dbias32);
  }
  const bool identity_prologue = a.norm == Norm::kNone;
  const bool want_dx = grads.dx.numel() > 0;
  const bool want_norm_grads =
      want_dx || grads.dln_weight.numel() > 0 || grads.dln_bias.numel() > 0;
  bool want_dweight = false;
  for (const Tensor& d : grads.dweights) want_dweight = want_dweight || d.numel() > 0;
  // dh and h as in ln_linear_backward: dh in dx's buffer when dx is wanted, else a workspace
  // row range; h another.
  const bool dh_buffer = want_norm_grads && !want_dx;
  const bool h_buffer = want_dweight && !identity_prologue;
  const BackwardBuffers buffer(x, rows, in_features, int64_t{dh_buffer} + int64_t{h_buffer});
  // Straight-through (online quant): the linear's gradients at the fake-quantised operands.
  const bool online = a.quant == Quant::kBitnetOnline;
  Tensor dh;
  if (want_norm_grads) {
    dh = want_dx ? grads.dx : buffer(0);
    bool first = true;
    for (size_t i = 0; i < n; ++i) {
      if (!a.grad_outs[i].defined()) continue;
      gemm::matmul(gemm::Role::kInputGrad, a.grad_outs[i],
                   online ? fake_quant_weight(a.weights[i]) : a.weights[i], dh,
                   /*accumulate=*/!first);
      first = false;
    }
    if (first) dh.zero_();
  }
  Tensor h;
  if (want_dweight) h = identity_prologue ? x : buffer(int64_t{dh_buffer});
  if (!identity_prologue && (want_norm_grads || want_dweight)) {
    norm_backward_and_h({dh, x, a.ln_weight, a.ln_bias, a.mean, a.rstd, std::nullopt, a.norm},
                        {grads.dx, grads.dln_weight, grads.dln_bias},
                        want_dweight ? h : Tensor());
  }
  if (want_dweight && online) h = fake_quant_rows(h, !identity_prologue);
  for (size_t i = 0; i < n; ++i) {
    if (grads.dweights[i].numel() == 0) continue;
    if (!a.grad_outs[i].defined()) {
      grads.dweights[i].zero_();
    } else {
      grads.dweights[i] =
          gemm::matmul(gemm::Role::kWeightGrad, a.grad_outs[i].t(), h, Tensor(), false);
    }
  }
}

}  // namespace magneto::cpu
