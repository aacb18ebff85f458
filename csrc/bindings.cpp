// The one bindings file of magneto_kernels._C: checks tensors (shape, dtype, device, contiguity;
// errors name the argument and raise ValueError), allocates outputs, and registers the "native" op
// family (schemas, fake impls and autograd formulas live in magneto_kernels/library.py) for the
// CPU dispatch key and, when built with MAGNETO_WITH_CUDA, for CUDA.
//
// The kernels themselves know nothing of torch: csrc/cpu/kernels.h (CPU) and
// csrc/cuda/kernels.h (CUDA). ln_linear's GEMMs run between our memory-bound passes, on CPU
// through csrc/cpu_gemm.h (oneDNN's matmul where usable, else at::mm), on CUDA through cuBLAS:
//
//   forward   H = N(in_act(x))                      one pass over x (rows, stats)
//             u = H @ W^T + bias                    (bias: CPU in oneDNN's epilogue, CUDA below)
//             out = alpha·residual + dropout(act(u))   one pass over u, in place unless u is kept
//                                                       (none without residual, act, dropout)
//             (a CPU operand larger than the workspace goes in row blocks, each GEMM
//             accumulating into out = alpha·residual + bias when nothing else follows)
//   backward  dz = dy ⊙ dropout mask ⊙ act'(u), dbias = Σ dz    one pass over dy (skipped,
//                                                               bar the dbias sum, when dz = dy)
//             dh = dz @ W
//             one pass over x: dx = norm backward of dh ⊙ in_act'(x), dgamma/dbeta partials,
//                              and H = N(in_act(x)) recomputed from the saved stats
//             dW = dz^T @ H
#include <torch/python.h>  // pybind11 with the Tensor type casters

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/kernels.h"
#include "cpu_gemm.h"

#ifdef MAGNETO_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda/kernels.h"
#endif

namespace magneto {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------------------ argument checks

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t);
  }
  return DType::kFloat32;
}

Norm parse_norm(std::string_view norm, bool allow_none) {
  if (norm == "layer") return Norm::kLayer;
  if (norm == "rms") return Norm::kRms;
  if (norm == "none" && allow_none) return Norm::kNone;
  TORCH_CHECK_VALUE(false, "norm must be ", allow_none ? "'layer', 'rms' or 'none'" : "'layer' or 'rms'",
                    ", got '", norm, "'");
  return Norm::kLayer;
}

Activation parse_activation(std::string_view name, const char* arg) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, arg, " must be one of 'none', 'gelu', 'gelu_tanh', 'relu', 'silu', got '",
                    name, "'");
  return Activation::kNone;
}

// x: the 2-D row-major input every other argument is checked against.
void check_input(const Tensor& x, const char* name = "x") {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be 2-D (rows, features), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                        x.scalar_type() == at::kHalf,
                    name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), name,
                    " must be on a CPU or CUDA device, got ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), name, " must be contiguous");
}

void check_like(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef shape,
                std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  const at::ScalarType want = dtype.value_or(x.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == want, name, " must have dtype ", want, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// A norm parameter: (cols,), x's dtype or float32, on x's device, contiguous.
void check_param(const OptTensor& t, const char* name, const Tensor& x) {
  if (!t.has_value()) return;
  const int64_t cols = x.size(1);
  TORCH_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == cols, name, " must have shape (", cols,
                    ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, name,
                    " must have x's dtype (", x.scalar_type(), ") or float32, got ",
                    t->scalar_type());
  TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
}

void check_norm_params(const OptTensor& weight, const OptTensor& bias, Norm norm, const Tensor& x,
                       const char* weight_name, const char* bias_name) {
  check_param(weight, weight_name, x);
  check_param(bias, bias_name, x);
  TORCH_CHECK_VALUE(!(bias.has_value() && norm == Norm::kRms), bias_name,
                    " must be None for norm='rms' (RMSNorm has no bias)");
  TORCH_CHECK_VALUE(!(bias.has_value() && !weight.has_value()), bias_name, " given without ",
                    weight_name);
  TORCH_CHECK_VALUE(!(weight.has_value() && norm == Norm::kNone), weight_name,
                    " must be None for norm='none'");
}

// Saved statistics: float32 (rows,) where the norm has them, anything empty where it does not.
void check_stats(const Tensor& mean, const Tensor& rstd, Norm norm, const Tensor& x) {
  const int64_t rows = x.size(0);
  if (norm == Norm::kLayer) check_like(mean, "mean", x, {rows}, at::kFloat);
  if (norm != Norm::kNone) check_like(rstd, "rstd", x, {rows}, at::kFloat);
}

void check_eps(double eps) { TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps); }

// The dropout seed (a 0-d int64 tensor on x's device) when dropout_p > 0.
void check_dropout(const OptTensor& seed, double p, const Tensor& x) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return;
  TORCH_CHECK_VALUE(seed.has_value(), "seed must be given when dropout_p > 0");
  check_like(*seed, "seed", x, {}, at::kLong);
}

std::array<bool, 5> mask_of(const c10::List<bool>& output_mask, size_t n) {
  TORCH_CHECK_VALUE(output_mask.size() == n, "output_mask must have ", n, " entries, got ",
                    output_mask.size());
  std::array<bool, 5> mask{};
  for (size_t i = 0; i < n; ++i) mask[i] = output_mask.get(i);
  return mask;
}

// Tests set this (magneto_kernels._C._set_poison_outputs) to fill every output and intermediate
// buffer with NaN before the kernels write it, so that an element a kernel forgets shows up.
std::atomic<bool> poison_outputs{false};

Tensor new_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  if (poison_outputs.load(std::memory_order_relaxed)) t.fill_(NAN);
  return t;
}

Tensor new_like(const Tensor& t) { return new_tensor(t.sizes(), t.options()); }

Tensor empty0(const Tensor& x) { return at::empty({0}, x.options()); }

Tensor stats_tensor(const Tensor& x, bool present) {
  return new_tensor({present ? x.size(0) : 0}, x.options().dtype(at::kFloat));
}

// ----------------------------------------------------------------------------------- CPU path

// Norm parameters as float32 pointers for the CPU kernels (a float32 copy when stored in bf16/fp16).
struct ParamF32 {
  Tensor t;
  explicit ParamF32(const OptTensor& p) {
    if (p.has_value()) t = p->scalar_type() == at::kFloat ? *p : p->to(at::kFloat);
  }
  const float* ptr() const { return t.defined() ? t.data_ptr<float>() : nullptr; }
};

// A float32 gradient buffer for a parameter: the output itself when the parameter is float32.
Tensor grad_f32(const Tensor& out) {
  return out.scalar_type() == at::kFloat ? out
                                         : new_tensor(out.sizes(), out.options().dtype(at::kFloat));
}

void copy_back(const Tensor& out, const Tensor& f32) {
  if (!out.is_same(f32)) out.copy_(f32);
}

float* opt_float_ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr;
}

void cpu_norm_forward(const Tensor& x, const OptTensor& residual, double alpha,
                      const OptTensor& weight, const OptTensor& bias, double eps, Norm norm,
                      Activation input_activation, const Tensor& y, const Tensor& sum,
                      const Tensor& mean, const Tensor& rstd) {
  const ParamF32 w(weight), b(bias);
  cpu::NormForward a;
  a.dtype = dtype_code(x.scalar_type());
  a.norm = norm;
  a.input_activation = input_activation;
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.x = x.data_ptr();
  a.x_stride = a.cols;
  if (residual.has_value()) {
    a.residual = residual->data_ptr();
    a.residual_stride = a.cols;
    a.alpha = static_cast<float>(alpha);
  }
  a.gamma = w.ptr();
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
  cpu::norm_forward(a);
}

// Norm backward (dy given) and/or recomputation of h = N(in_act(x)) (h defined).
void cpu_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                       const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                       const OptTensor& grad_accum, Norm norm, Activation input_activation,
                       const Tensor& dx, const Tensor& dweight, const Tensor& dbias,
                       const Tensor& h) {
  const ParamF32 w(weight), b(bias);
  const Tensor dw32 = dweight.numel() > 0 ? grad_f32(dweight) : Tensor();
  const Tensor db32 = dbias.numel() > 0 ? grad_f32(dbias) : Tensor();
  cpu::NormBackward a;
  a.dtype = dtype_code(x.scalar_type());
  a.norm = norm;
  a.input_activation = input_activation;
  a.rows = x.size(0);
  a.cols = x.size(1);
  if (dy.defined()) {
    a.dy = dy.data_ptr();
    a.dy_stride = a.cols;
  }
  a.x = x.data_ptr();
  a.x_stride = a.cols;
  a.mean = opt_float_ptr(mean);
  a.rstd = opt_float_ptr(rstd);
  a.gamma = w.ptr();
  a.beta = b.ptr();
  if (grad_accum.has_value()) {
    a.grad_accum = grad_accum->data_ptr();
    a.grad_accum_stride = a.cols;
  }
  if (dx.numel() > 0) {
    a.dx = dx.data_ptr();
    a.dx_stride = a.cols;
  }
  a.dgamma = dw32.defined() ? dw32.data_ptr<float>() : nullptr;
  a.dbeta = db32.defined() ? db32.data_ptr<float>() : nullptr;
  if (h.defined()) {
    a.h = h.data_ptr();
    a.h_stride = a.cols;
  }
  cpu::norm_backward(a);
  if (dw32.defined()) copy_back(dweight, dw32);
  if (db32.defined()) copy_back(dbias, db32);
}

uint64_t seed_value(const OptTensor& seed, double p) {
  return p > 0.0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

// The CPU ln_linear's GEMM operand H = N(in_act(x)) is recomputed in the forward and in the
// backward and dropped right after its GEMM. It lives in a per-thread workspace kept between calls:
// a fresh M×K tensor per call would be returned to the OS on free (glibc maps large blocks) and
// page-faulted in again, 4 KiB at a time, on every call. The workspace holds at most
// MAGNETO_CPU_WORKSPACE_MB (default 64) MiB. A forward whose H is larger runs in row blocks
// through it, if a block of kMinBlockRows rows fits (smaller GEMMs lose speed: 128-row blocks
// measured ~10% slower at K=3072); otherwise, and for a backward whose H does not fit, H is
// allocated per call (MAGNETO_CPU_WORKSPACE_MB=0: always).
constexpr int64_t kMinBlockRows = 256;

int64_t cpu_workspace_limit_bytes() {
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
int64_t cpu_workspace_block_rows(const Tensor& x, int64_t rows, int64_t cols, int64_t min_rows) {
  const int64_t row_bytes = std::max<int64_t>(1, cols * static_cast<int64_t>(x.element_size()));
  const int64_t fit = cpu_workspace_limit_bytes() / row_bytes;
  if (fit >= rows) return rows;
  return fit >= min_rows ? fit : 0;
}

// A rows×cols tensor like x in this thread's workspace (grown as needed, up to the limit);
// valid until the next call on this thread.
Tensor cpu_workspace(const Tensor& x, int64_t rows, int64_t cols) {
  thread_local Tensor buffer;
  const int64_t bytes = rows * cols * static_cast<int64_t>(x.element_size());
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = Tensor();  // free the old one first
    buffer = at::empty({bytes}, x.options().dtype(at::kByte));
  }
  Tensor view = buffer.narrow(0, 0, bytes).view(x.scalar_type()).view({rows, cols});
  if (poison_outputs.load(std::memory_order_relaxed)) view.fill_(NAN);
  return view;
}

// Rows [begin, begin + count) of a per-row tensor; empty tensors (absent stats) stay empty.
Tensor row_slice(const Tensor& t, int64_t begin, int64_t count) {
  return t.numel() == 0 ? t : t.narrow(0, begin, count);
}

// ln_linear forward on CPU: (out, preact); mean and rstd are filled.
std::tuple<Tensor, Tensor> cpu_ln_linear(const Tensor& x, const OptTensor& ln_weight,
                                         const OptTensor& ln_bias, const Tensor& weight,
                                         const OptTensor& bias, const OptTensor& residual,
                                         const OptTensor& seed, double eps, Norm norm,
                                         Activation input_activation, Activation activation,
                                         double alpha, double dropout_p, const Tensor& mean,
                                         const Tensor& rstd) {
  const int64_t rows = x.size(0), in_features = x.size(1), cols = weight.size(0);
  const DType dtype = dtype_code(x.scalar_type());
  const Tensor wt = weight.t();
  const bool identity_prologue = norm == Norm::kNone && input_activation == Activation::kNone;
  // H in blocks of `block` rows through the workspace, or (block_rows 0) all at once, allocated.
  const int64_t block_rows = cpu_workspace_block_rows(x, rows, in_features, kMinBlockRows);
  const int64_t block = block_rows > 0 ? block_rows : rows;
  auto operand = [&](int64_t count) {
    return block_rows > 0 ? cpu_workspace(x, count, in_features)
                          : new_tensor({count, in_features}, x.options());
  };
  Tensor u;
  bool residual_added = false;
  if (identity_prologue || block == rows) {
    // One GEMM with the bias in its epilogue: u = H W^T + b. The residual comes in the pass over
    // u below: accumulating into an output filled with alpha·residual + b instead makes the GEMM
    // read it, ~2.5% of the fc2-shaped GEMM against ~1% for the extra pass.
    Tensor H = x;
    if (!identity_prologue) {
      H = operand(rows);
      cpu_norm_forward(x, std::nullopt, 1.0, ln_weight, ln_bias, eps, norm, input_activation, H,
                       Tensor(), mean, rstd);
    }
    u = cpu_gemm::linear(H, weight, bias);
  } else {
    // H = N(in_act(x)) block by block, each block followed by its GEMM, accumulating into
    // u = alpha·residual + bias (either optional; the residual only when nothing follows the
    // GEMM), written in one pass.
    residual_added = activation == Activation::kNone && dropout_p == 0.0 && residual.has_value();
    u = new_tensor({rows, cols}, x.options());
    const bool init = residual_added || bias.has_value();
    if (init) {
      cpu::residual_bias_init(dtype, rows, cols,
                              residual_added ? residual->data_ptr() : nullptr, cols,
                              static_cast<float>(alpha),
                              bias.has_value() ? bias->data_ptr() : nullptr, u.data_ptr(), cols);
    }
    for (int64_t begin = 0; begin < rows; begin += block) {
      const int64_t count = std::min(block, rows - begin);
      const Tensor H = operand(count);
      cpu_norm_forward(x.narrow(0, begin, count), std::nullopt, 1.0, ln_weight, ln_bias, eps,
                       norm, input_activation, H, Tensor(), row_slice(mean, begin, count),
                       row_slice(rstd, begin, count));
      cpu_gemm::matmul(H, wt, u.narrow(0, begin, count), /*accumulate=*/init);
    }
  }
  const bool pass_needed = activation != Activation::kNone || dropout_p > 0.0 ||
                           (residual.has_value() && !residual_added);
  if (!pass_needed) return {u, empty0(x)};
  // u = H W^T + b: activation, dropout and residual in one pass over it (in place unless u is
  // kept for the backward).
  const bool keep_preact = activation != Activation::kNone;
  Tensor out = keep_preact ? new_like(u) : u;
  cpu::LinearEpilogue e;
  e.dtype = dtype;
  e.activation = activation;
  e.rows = rows;
  e.cols = cols;
  e.preact = u.data_ptr();
  e.preact_stride = cols;
  if (residual.has_value()) {
    e.residual = residual->data_ptr();
    e.residual_stride = cols;
    e.alpha = static_cast<float>(alpha);
  }
  e.seed = seed_value(seed, dropout_p);
  e.dropout_p = dropout_p;
  e.out = out.data_ptr();
  e.out_stride = cols;
  cpu::linear_epilogue(e);
  return {out, keep_preact ? u : empty0(x)};
}

// ln_linear backward on CPU into the allocated gradients (empty ones are not wanted); returns dx
// (which may be replaced by dh when the prologue is the identity).
Tensor cpu_ln_linear_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& ln_weight,
                              const OptTensor& ln_bias, const Tensor& weight, const Tensor& mean,
                              const Tensor& rstd, const Tensor& preact, const OptTensor& seed,
                              Norm norm, Activation input_activation, Activation activation,
                              double dropout_p, Tensor dx, const Tensor& dln_w,
                              const Tensor& dln_b, Tensor dw, Tensor db) {
  const int64_t rows = x.size(0), out_features = weight.size(0);
  // dz = dy ⊙ mask/(1−p) ⊙ act'(u), with dbias = Σ_rows dz in the same pass.
  const bool dz_is_dy = activation == Activation::kNone && dropout_p == 0.0;
  Tensor dz = dz_is_dy ? grad_out : new_like(grad_out);
  const Tensor db32 = db.numel() > 0 ? grad_f32(db) : Tensor();
  if (!dz_is_dy || db32.defined()) {
    cpu::LinearGradEpilogue g;
    g.dtype = dtype_code(x.scalar_type());
    g.activation = activation;
    g.rows = rows;
    g.cols = out_features;
    g.dy = grad_out.data_ptr();
    g.dy_stride = out_features;
    if (activation != Activation::kNone) {
      g.preact = preact.data_ptr();
      g.preact_stride = out_features;
    }
    g.seed = seed_value(seed, dropout_p);
    g.dropout_p = dropout_p;
    if (!dz_is_dy) {
      g.dz = dz.data_ptr();
      g.dz_stride = out_features;
    }
    g.dbias = db32.defined() ? db32.data_ptr<float>() : nullptr;
    cpu::linear_grad_epilogue(g);
    if (db32.defined()) copy_back(db, db32);
  }
  // dh = dz @ W, then one pass over x for the norm backward and for H = N(in_act(x)). dh goes
  // straight into dx when dx is wanted, and the norm backward turns it into dx in place, row by
  // row: no M×K buffer for dh.
  const bool identity_prologue = norm == Norm::kNone && input_activation == Activation::kNone;
  const bool want_dx = dx.numel() > 0;
  const bool want_norm_grads = want_dx || dln_w.numel() > 0 || dln_b.numel() > 0;
  const bool want_dw = dw.numel() > 0;
  Tensor dh;
  if (want_norm_grads) {
    dh = want_dx ? dx : new_tensor({rows, x.size(1)}, x.options());
    cpu_gemm::matmul(dz, weight, dh, /*accumulate=*/false);
  }
  Tensor H;  // the GEMM operand of dW, in the workspace when it fits (see cpu_workspace())
  if (want_dw && identity_prologue) {
    H = x;
  } else if (want_dw) {
    const bool fits = cpu_workspace_block_rows(x, rows, x.size(1), rows) == rows;
    H = fits ? cpu_workspace(x, rows, x.size(1)) : new_like(x);
  }
  if (identity_prologue && want_dx) {
    // N and in_act are the identity: dx = dh, already in place
  } else if (want_norm_grads || (want_dw && !identity_prologue)) {
    cpu_norm_backward(dh, x, ln_weight, ln_bias, mean, rstd, std::nullopt, norm, input_activation,
                      dx, dln_w, dln_b, identity_prologue ? Tensor() : H);
  }
  if (want_dw) cpu_gemm::matmul(dz.t(), H, dw, /*accumulate=*/false);
  return dx;
}

// ---------------------------------------------------------------------------------- CUDA path
#ifdef MAGNETO_WITH_CUDA

void check_status(gpu::Status status) { TORCH_CHECK(status == nullptr, status); }

cudaStream_t current_stream(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

const void* opt_ptr(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

// Norm weight and bias in the one parameter dtype the CUDA kernels take (both float32 when the
// two were given in different dtypes).
struct CudaParams {
  Tensor weight, bias;
  DType dtype;
  CudaParams(const OptTensor& w, const OptTensor& b, const Tensor& x) {
    const bool mixed = w.has_value() && b.has_value() && w->scalar_type() != b->scalar_type();
    if (w.has_value()) weight = mixed ? w->to(at::kFloat) : *w;
    if (b.has_value()) bias = mixed ? b->to(at::kFloat) : *b;
    const Tensor& any = weight.defined() ? weight : bias;
    dtype = dtype_code(any.defined() ? any.scalar_type() : x.scalar_type());
  }
  // The gradient buffer of a parameter output in this dtype (the output itself when it matches).
  Tensor grad_buffer(const Tensor& out) const {
    if (out.numel() == 0 || dtype_code(out.scalar_type()) == dtype) return out;
    return new_tensor(out.sizes(), out.options().dtype(at::kFloat));  // params went float32
  }
};

// The float32 partial sums of the column reductions (bytes: a *_workspace_bytes result, a
// multiple of 4); NaN-poisoned in tests like every buffer, so a partial row a kernel fails to
// write shows up in the gradient instead of reading stale memory.
Tensor workspace(const Tensor& x, size_t bytes) {
  return new_tensor({static_cast<int64_t>((bytes + 3) / 4)}, x.options().dtype(at::kFloat));
}

// norm_forward on CUDA; with saved stats given, they are applied instead of computed.
void cuda_norm_forward(const Tensor& x, const OptTensor& residual, double alpha,
                       const OptTensor& weight, const OptTensor& bias, double eps, Norm norm,
                       Activation input_activation, const Tensor& y, const Tensor& sum,
                       const Tensor& mean, const Tensor& rstd, const Tensor& saved_mean = Tensor(),
                       const Tensor& saved_rstd = Tensor()) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaParams params(weight, bias, x);
  gpu::NormForwardParams p;
  p.x = x.data_ptr();
  p.x_stride = x.size(1);
  if (residual.has_value()) {
    p.residual = residual->data_ptr();
    p.residual_stride = x.size(1);
    p.alpha = static_cast<float>(alpha);
  }
  p.weight = opt_ptr(params.weight);
  p.bias = opt_ptr(params.bias);
  p.saved_mean = static_cast<const float*>(opt_ptr(saved_mean));
  p.saved_rstd = static_cast<const float*>(opt_ptr(saved_rstd));
  p.y = y.data_ptr();
  p.y_stride = x.size(1);
  if (sum.defined()) {
    p.sum = sum.data_ptr();
    p.sum_stride = x.size(1);
  }
  p.mean = opt_float_ptr(mean);
  p.rstd = opt_float_ptr(rstd);
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.eps = static_cast<float>(eps);
  p.norm = norm;
  p.input_activation = input_activation;
  p.dtype = dtype_code(x.scalar_type());
  p.param_dtype = params.dtype;
  check_status(gpu::norm_forward(p, current_stream(x)));
}

void cuda_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                        const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                        const OptTensor& grad_accum, Norm norm, Activation input_activation,
                        const Tensor& dx, const Tensor& dweight, const Tensor& dbias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaParams params(weight, bias, x);
  const Tensor dw = params.grad_buffer(dweight), db = params.grad_buffer(dbias);
  gpu::NormBackwardParams p;
  p.dy = dy.data_ptr();
  p.dy_stride = x.size(1);
  p.x = x.data_ptr();
  p.x_stride = x.size(1);
  p.weight = opt_ptr(params.weight);
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
  p.dweight = dw.numel() > 0 ? dw.data_ptr() : nullptr;
  p.dbias = db.numel() > 0 ? db.data_ptr() : nullptr;
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.norm = norm;
  p.input_activation = input_activation;
  p.dtype = dtype_code(x.scalar_type());
  p.param_dtype = params.dtype;
  p.workspace_bytes = gpu::norm_backward_workspace_bytes(
      p.rows, p.cols, p.dtype, norm, input_activation, p.dweight != nullptr, p.dbias != nullptr);
  const Tensor ws = workspace(x, p.workspace_bytes);
  p.workspace = p.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
  check_status(gpu::norm_backward(p, current_stream(x)));
  if (!dw.is_same(dweight)) dweight.copy_(dw);
  if (!db.is_same(dbias)) dbias.copy_(db);
}

std::tuple<Tensor, Tensor> cuda_ln_linear(const Tensor& x, const OptTensor& ln_weight,
                                          const OptTensor& ln_bias, const Tensor& weight,
                                          const OptTensor& bias, const OptTensor& residual,
                                          const OptTensor& seed, double eps, Norm norm,
                                          Activation input_activation, Activation activation,
                                          double alpha, double dropout_p, const Tensor& mean,
                                          const Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor H = x;
  if (norm != Norm::kNone || input_activation != Activation::kNone) {
    H = new_like(x);
    cuda_norm_forward(x, std::nullopt, 1.0, ln_weight, ln_bias, eps, norm, input_activation, H,
                      Tensor(), mean, rstd);
  }
  const Tensor wt = weight.t();
  if (activation == Activation::kNone && dropout_p == 0.0 && !residual.has_value()) {
    return {bias.has_value() ? at::addmm(*bias, H, wt) : at::mm(H, wt), empty0(x)};
  }
  // z = H W^T by cuBLAS; bias, activation, dropout and residual in one epilogue pass.
  Tensor z = at::mm(H, wt);
  const bool keep_preact = activation != Activation::kNone;
  Tensor preact = keep_preact ? new_like(z) : empty0(x);
  gpu::LinearEpilogueParams e;
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
  check_status(gpu::linear_epilogue(e, current_stream(x)));
  return {z, preact};
}

Tensor cuda_ln_linear_backward(const Tensor& grad_out, const Tensor& x,
                               const OptTensor& ln_weight, const OptTensor& ln_bias,
                               const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                               const Tensor& preact, const OptTensor& seed, Norm norm,
                               Activation input_activation, Activation activation,
                               double dropout_p, Tensor dx, const Tensor& dln_w,
                               const Tensor& dln_b, Tensor dw, Tensor db) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), out_features = weight.size(0);
  const bool dz_is_dy = activation == Activation::kNone && dropout_p == 0.0;
  Tensor dz = grad_out;
  if (!dz_is_dy) {
    dz = new_like(grad_out);
    gpu::LinearBackwardPrologueParams g;
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
    g.dbias = db.numel() > 0 ? db.data_ptr() : nullptr;
    g.rows = rows;
    g.cols = out_features;
    g.activation = activation;
    g.dtype = dtype_code(x.scalar_type());
    g.workspace_bytes = gpu::linear_backward_prologue_workspace_bytes(
        rows, out_features, g.dtype, g.dbias != nullptr);
    const Tensor ws = workspace(x, g.workspace_bytes);
    g.workspace = g.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
    check_status(gpu::linear_backward_prologue(g, current_stream(x)));
  } else if (db.numel() > 0) {
    at::sum_out(db, grad_out, {0});
  }
  const bool identity_prologue = norm == Norm::kNone && input_activation == Activation::kNone;
  const bool want_dx = dx.numel() > 0;
  const bool want_norm_grads = want_dx || dln_w.numel() > 0 || dln_b.numel() > 0;
  if (want_norm_grads) {
    Tensor dh = at::mm(dz, weight);
    if (identity_prologue) {
      dx = dh;
    } else {
      cuda_norm_backward(dh, x, ln_weight, ln_bias, mean, rstd, std::nullopt, norm,
                         input_activation, dx, dln_w, dln_b);
    }
  }
  if (dw.numel() > 0) {
    // H = N(in_act(x)) recomputed from the saved statistics.
    Tensor H = x;
    if (!identity_prologue) {
      H = new_like(x);
      cuda_norm_forward(x, std::nullopt, 1.0, ln_weight, ln_bias, 0.0, norm, input_activation,
                        H, Tensor(), Tensor(), Tensor(), mean, rstd);
    }
    at::mm_out(dw, dz.t(), H);
  }
  return dx;
}

#define MAGNETO_CUDA_OR(call) call
#else
#define MAGNETO_CUDA_OR(call) \
  TORCH_CHECK(false, "magneto_kernels._C was built without CUDA kernels")
#endif  // MAGNETO_WITH_CUDA

// ----------------------------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor, Tensor> layer_norm_native(const Tensor& x, const OptTensor& weight,
                                                  const OptTensor& bias, double eps,
                                                  c10::string_view norm_name) {
  check_input(x);
  const Norm norm = parse_norm(norm_name, false);
  check_norm_params(weight, bias, norm, x, "weight", "bias");
  check_eps(eps);
  Tensor y = new_like(x);
  Tensor mean = stats_tensor(x, norm == Norm::kLayer);
  Tensor rstd = stats_tensor(x, true);
  if (x.is_cpu()) {
    cpu_norm_forward(x, std::nullopt, 1.0, weight, bias, eps, norm, Activation::kNone, y,
                     Tensor(), mean, rstd);
  } else {
    MAGNETO_CUDA_OR(cuda_norm_forward(x, std::nullopt, 1.0, weight, bias, eps, norm,
                                      Activation::kNone, y, Tensor(), mean, rstd));
  }
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_native(
    const Tensor& grad_y, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const Tensor& mean, const Tensor& rstd, const OptTensor& grad_accum,
    c10::string_view norm_name, const c10::List<bool>& output_mask) {
  check_input(x);
  const Norm norm = parse_norm(norm_name, false);
  check_norm_params(weight, bias, norm, x, "weight", "bias");
  check_like(grad_y, "grad_y", x, x.sizes(), std::nullopt);
  check_stats(mean, rstd, norm, x);
  if (grad_accum.has_value()) check_like(*grad_accum, "grad_accum", x, x.sizes(), std::nullopt);
  const auto mask = mask_of(output_mask, 3);
  Tensor dx = mask[0] ? new_like(x) : empty0(x);
  Tensor dw = mask[1] && weight.has_value() ? new_like(*weight) : empty0(x);
  Tensor db = mask[2] && bias.has_value() ? new_like(*bias) : empty0(x);
  if (dx.numel() == 0 && dw.numel() == 0 && db.numel() == 0) return {dx, dw, db};
  if (x.is_cpu()) {
    cpu_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm, Activation::kNone,
                      dx, dw, db, Tensor());
  } else {
    MAGNETO_CUDA_OR(cuda_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm,
                                       Activation::kNone, dx, dw, db));
  }
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_native(
    const Tensor& x, const Tensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, double alpha, c10::string_view norm_name) {
  check_input(x);
  const Norm norm = parse_norm(norm_name, false);
  check_like(residual, "residual", x, x.sizes(), std::nullopt);
  check_norm_params(weight, bias, norm, x, "weight", "bias");
  check_eps(eps);
  Tensor y = new_like(x);
  Tensor s = new_like(x);
  Tensor mean = stats_tensor(x, norm == Norm::kLayer);
  Tensor rstd = stats_tensor(x, true);
  if (x.is_cpu()) {
    cpu_norm_forward(x, residual, alpha, weight, bias, eps, norm, Activation::kNone, y, s, mean,
                     rstd);
  } else {
    MAGNETO_CUDA_OR(cuda_norm_forward(x, residual, alpha, weight, bias, eps, norm,
                                      Activation::kNone, y, s, mean, rstd));
  }
  return {y, s, mean, rstd};
}

void check_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                    "weight must have shape (out_features, ", x.size(1), "), got ",
                    weight.sizes());
  check_like(weight, "weight", x, weight.sizes(), std::nullopt);
  if (bias.has_value()) check_like(*bias, "bias", x, {weight.size(0)}, std::nullopt);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ln_linear_native(
    const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& weight,
    const OptTensor& bias, const OptTensor& residual, const OptTensor& seed, double eps,
    c10::string_view norm_name, c10::string_view input_activation_name,
    c10::string_view activation_name, double alpha, double dropout_p) {
  check_input(x);
  const Norm norm = parse_norm(norm_name, true);
  const Activation input_activation = parse_activation(input_activation_name, "input_activation");
  const Activation activation = parse_activation(activation_name, "activation");
  check_norm_params(ln_weight, ln_bias, norm, x, "ln_weight", "ln_bias");
  check_linear(x, weight, bias);
  if (residual.has_value()) {
    check_like(*residual, "residual", x, {x.size(0), weight.size(0)}, std::nullopt);
  }
  check_dropout(seed, dropout_p, x);
  check_eps(eps);
  Tensor mean = stats_tensor(x, norm == Norm::kLayer);
  Tensor rstd = stats_tensor(x, norm != Norm::kNone);
  Tensor out, preact;
  if (x.is_cpu()) {
    std::tie(out, preact) = cpu_ln_linear(x, ln_weight, ln_bias, weight, bias, residual, seed, eps,
                                          norm, input_activation, activation, alpha, dropout_p,
                                          mean, rstd);
  } else {
    MAGNETO_CUDA_OR(std::tie(out, preact) = cuda_ln_linear(
                        x, ln_weight, ln_bias, weight, bias, residual, seed, eps, norm,
                        input_activation, activation, alpha, dropout_p, mean, rstd));
  }
  return {out, mean, rstd, preact};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_linear_backward_native(
    const Tensor& grad_out, const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
    const Tensor& weight, const Tensor& mean, const Tensor& rstd, const Tensor& preact,
    const OptTensor& seed, c10::string_view norm_name, c10::string_view input_activation_name,
    c10::string_view activation_name, double dropout_p, const c10::List<bool>& output_mask) {
  check_input(x);
  const Norm norm = parse_norm(norm_name, true);
  const Activation input_activation = parse_activation(input_activation_name, "input_activation");
  const Activation activation = parse_activation(activation_name, "activation");
  check_norm_params(ln_weight, ln_bias, norm, x, "ln_weight", "ln_bias");
  check_linear(x, weight, std::nullopt);
  const int64_t rows = x.size(0), out_features = weight.size(0);
  check_like(grad_out, "grad_out", x, {rows, out_features}, std::nullopt);
  check_stats(mean, rstd, norm, x);
  if (activation != Activation::kNone) {
    check_like(preact, "preact", x, {rows, out_features}, std::nullopt);
  }
  check_dropout(seed, dropout_p, x);
  const auto mask = mask_of(output_mask, 5);
  Tensor dx = mask[0] ? new_like(x) : empty0(x);
  Tensor dln_w = mask[1] && ln_weight.has_value() ? new_like(*ln_weight) : empty0(x);
  Tensor dln_b = mask[2] && ln_bias.has_value() ? new_like(*ln_bias) : empty0(x);
  Tensor dw = mask[3] ? new_like(weight) : empty0(x);
  Tensor db = mask[4] ? new_tensor({out_features}, weight.options()) : empty0(x);
  if (x.is_cpu()) {
    dx = cpu_ln_linear_backward(grad_out, x, ln_weight, ln_bias, weight, mean, rstd, preact, seed,
                                norm, input_activation, activation, dropout_p, dx, dln_w, dln_b,
                                dw, db);
  } else {
    MAGNETO_CUDA_OR(dx = cuda_ln_linear_backward(grad_out, x, ln_weight, ln_bias, weight, mean,
                                                 rstd, preact, seed, norm, input_activation,
                                                 activation, dropout_p, dx, dln_w, dln_b, dw,
                                                 db));
  }
  return {dx, dln_w, dln_b, dw, db};
}

}  // namespace
}  // namespace magneto

// One kernel per op serves both dispatch keys: it branches on x's device.
#define MAGNETO_REGISTER_NATIVE_FAMILY(m)                                            \
  m.impl("layer_norm_native", TORCH_FN(magneto::layer_norm_native));                     \
  m.impl("layer_norm_backward_native", TORCH_FN(magneto::layer_norm_backward_native));   \
  m.impl("add_layer_norm_native", TORCH_FN(magneto::add_layer_norm_native));             \
  m.impl("ln_linear_native", TORCH_FN(magneto::ln_linear_native));                       \
  m.impl("ln_linear_backward_native", TORCH_FN(magneto::ln_linear_backward_native));

TORCH_LIBRARY_IMPL(magneto, CPU, m) { MAGNETO_REGISTER_NATIVE_FAMILY(m) }

#ifdef MAGNETO_WITH_CUDA
TORCH_LIBRARY_IMPL(magneto, CUDA, m) { MAGNETO_REGISTER_NATIVE_FAMILY(m) }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "magneto's C++ CPU and CUDA kernels; importing registers the magneto::*_native ops.";
  m.def("with_cuda", []() {
#ifdef MAGNETO_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("_set_poison_outputs", [](bool on) { magneto::poison_outputs = on; },
        "Tests only: fill outputs and buffers with NaN before the kernels write them.");
  m.def("cpu_gemm_engine", []() { return magneto::cpu_gemm::engine(); },
        "The GEMM engine of the CPU ln_linear: 'onednn' or 'aten' (see csrc/cpu_gemm.h).");
  m.def("_cpu_gemm",
        [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate) {
          magneto::cpu_gemm::matmul(a, b, out, accumulate);
        },
        "Benchmarks: out = a @ b (or out += a @ b) with the CPU ln_linear's GEMM engine.");
  m.def("_set_cpu_gemm_engine", [](const std::string& choice) { magneto::cpu_gemm::set_engine(choice); },
        "Benchmarks and tests: 'auto', 'onednn' or 'aten', overriding MAGNETO_CPU_GEMM.");
  m.def("cpu_capability", []() { return std::string(magneto::cpu::capability()); },
        "The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'default'.");
}
