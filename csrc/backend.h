// What a backend of the native family implements, declared once for both: cpu::Kernels
// (csrc/cpu/backend.cpp) and cuda::Kernels (csrc/cuda/backend.cpp, which the emulated build
// compiles for the CPU too). The ops (csrc/ops.h) call them with the arguments csrc/checks.cpp
// parsed and checked, and with the outputs allocated: every tensor is contiguous, on x's device
// and shaped as documented here, with x and the tensors row-for-row with it viewed as (rows,
// features) matrices; names are the codes of common.h; an empty output (numel 0) is one the
// caller does not want.
#pragma once

#include <cstdlib>
#include <string_view>
#include <vector>

#include "tensor_utils.h"

namespace magneto {

// MAGNETO_CUDA_EMULATE=1: CPU tensors run the CUDA kernels built for the CPU
// (magneto_kernels._C_emu), which then hold the CPU dispatch key (csrc/register.cpp).
inline bool cuda_emulation_requested() {
  const char* v = std::getenv("MAGNETO_CUDA_EMULATE");
  return v != nullptr && std::string_view(v) == "1";
}

// The names under which each backend's norm passes (a norm forward, or a norm backward with or
// without the recompute of h) show in torch.profiler: a test counts them, so that an op that
// should normalise its rows once does (RECORD_FUNCTION costs one flag check when no profiler
// runs).
inline constexpr char kNormForwardPass[] = "magneto::norm_forward_pass";
inline constexpr char kNormBackwardPass[] = "magneto::norm_backward_pass";

// y = N(in_act(x + alpha·residual))·gamma + beta: layer_norm, add_layer_norm (residual given)
// and ln_linear's prologue (input_activation). x is (rows, cols), or (rows, 2·cols) for a gated
// input activation (x = [gate | up], no residual then).
struct NormArgs {
  Tensor x;
  OptTensor residual;  // (rows, cols)
  double alpha = 1.0;
  OptTensor gamma, beta;  // (cols,), x's dtype or float32: the norm's weight and bias
  double eps = 0.0;
  Norm norm = Norm::kLayer;
  Activation input_activation = Activation::kNone;
};

struct NormOutputs {
  Tensor y;           // (rows, cols); undefined for norm_stats
  Tensor sum;         // x + alpha·residual, (rows, cols); undefined without a residual
  Tensor mean, rstd;  // (rows,) float32, written where non-empty
  // norm_stats (y undefined): (rows,) float32, the row's sum of squared deviations from its mean
  // (from 0 for RMSNorm), written instead of rstd; else undefined (the default: the unsharded
  // callers leave it out of their brace lists).
  Tensor m2 = {};
};

// The norm's backward: dx = N'ᵀ dy (⊙ in_act'(x)) + grad_accum, dgamma, dbeta; x, dx as in
// NormArgs, dy (rows, cols).
struct NormBackwardArgs {
  Tensor dy, x;
  OptTensor gamma, beta;
  Tensor mean, rstd;     // the forward's statistics
  OptTensor grad_accum;  // (rows, cols), added to dx (no gated input activation then)
  Norm norm = Norm::kLayer;
  Activation input_activation = Activation::kNone;
  // The sharded norm: (rows, 2) float32 [mean(g), mean(g·xhat)] over the whole row, every shard
  // (rows, 1) [mean(g·xhat)] for RMSNorm), used instead of this row's own; unsharded callers
  // leave it out.
  OptTensor row_means = {};
};

struct NormGrads {
  Tensor dx, dgamma, dbeta;
};

// out = alpha·residual + dropout(act(N(in_act(x)) @ weight^T + bias)). x is (rows, x_cols) with
// x_cols = in_features, or 2·in_features for a gated input activation.
struct LnLinearArgs {
  Tensor x;
  OptTensor ln_weight, ln_bias;  // (in_features,)
  Tensor weight;                 // (out_features, in_features)
  OptTensor bias;                // (out_features,)
  OptTensor residual;            // (rows, out_features)
  OptTensor seed;                // 0-d int64, given when dropout_p > 0
  double eps = 0.0;
  Norm norm = Norm::kLayer;  // kNone when ln_weight is absent
  Activation input_activation = Activation::kNone;
  Activation activation = Activation::kNone;
  double alpha = 1.0;
  double dropout_p = 0.0;
  // Quant::kNone, or BitNet's quantised projection (common.h; norm kRms or kNone, no output
  // activation, no dropout): weight the master weight (online), or packed (offline modes:
  // (out_features, in_features / 4) uint8, common.h's layout) with weight_scale (1,) float32.
  Quant quant = Quant::kNone;
  OptTensor weight_scale;
  // The row statistics to normalise with (the sharded norm's), else undefined: the backend's own.
  OptTensor given_mean, given_rstd;
  // Tensor parallelism: weight_scale given in online mode (the whole weight's mean|W|, (1,)
  // float32) instead of the weight's own, and row_amax (rows,) float32, h's per-row max|h| over
  // every shard, instead of the row's own (any quantised mode).
  OptTensor row_amax;
};

// out: (rows, out_features); preact the GEMM output before the activation, (rows, out_features)
// when activation != kNone, else empty. mean and rstd are allocated by the op, written by the
// backend.
struct LnLinearOutputs {
  Tensor out, mean, rstd, preact;
};

struct LnLinearBackwardArgs {
  Tensor grad_out, x;
  OptTensor ln_weight, ln_bias;
  Tensor weight, mean, rstd;
  Tensor preact;  // the forward's, when activation != kNone
  OptTensor seed;
  Norm norm = Norm::kLayer;
  Activation input_activation = Activation::kNone;
  Activation activation = Activation::kNone;
  double dropout_p = 0.0;
  Quant quant = Quant::kNone;  // kNone or kBitnetOnline (the offline modes have no backward)
  OptTensor weight_scale, row_amax;  // as LnLinearArgs's, given to the forward
};

// dx is (rows, x_cols); a backend may replace it by a tensor of its own (dh itself when the
// prologue is the identity). ln_linear_backward_partial: dx, dln_weight and dln_bias empty, dh
// (rows, in_features) and row_sums ((rows, 2) float32 [Σg, Σg·xhat] with g = dh·ln_weight;
// (rows, 1) [Σg·xhat] for RMSNorm) written instead when wanted.
struct LnLinearGrads {
  Tensor dx, dln_weight, dln_bias, dweight, dbias;
  Tensor dh = {}, row_sums = {};  // ln_linear_backward_partial's only
};

// y = x ⊙ keep/(1−p), keep = philox(seed, i·cols + j) >= dropout_threshold(p): the dropout op,
// x and y (rows, cols), the mask the fused ops draw (the CUDA kernels read the seed on the device).
struct DropoutArgs {
  Tensor x;
  Tensor seed;  // 0-d int64 on x's device
  double p = 0.0;
};

// ln_linear_group: outs[i] = N(x) @ weights[i]^T + biases[i], one norm for every weight. x is
// (rows, in_features), every weight (out_features_i, in_features).
struct LnLinearGroupArgs {
  Tensor x;
  OptTensor ln_weight, ln_bias;    // (in_features,)
  std::vector<Tensor> weights;     // (out_features_i, in_features)
  std::vector<OptTensor> biases;   // (out_features_i,), one entry per weight
  double eps = 0.0;
  Norm norm = Norm::kLayer;  // kNone when ln_weight is absent
  // As LnLinearArgs' (norm kRms or kNone), h's rows quantised once for every weight; offline,
  // every weight packed and weight_scales (n,) float32, weight_scales[i] weights[i]'s.
  Quant quant = Quant::kNone;
  OptTensor weight_scales;
  // outs is one (rows, Σ out_features_i) tensor, projection i writing its columns in place (from
  // Σ_{j<i} out_features_j, row stride Σ out_features_i): no concatenation after the GEMMs.
  bool concat = false;
};

// outs (rows, out_features_i), or the one concat output, are allocated by the backend
// (group_outputs); mean and rstd as in LnLinearOutputs.
struct LnLinearGroupOutputs {
  std::vector<Tensor> outs;
  Tensor mean, rstd;
};

// Where ln_linear_group's projections go: out.outs set to one new tensor per weight, or with concat
// to the one (rows, Σ out_features_i) tensor; returns projection i's destination (rows,
// out_features_i), a column range of out.outs[0] with concat.
inline std::vector<Tensor> group_outputs(const LnLinearGroupArgs& args,
                                         LnLinearGroupOutputs& out) {
  const int64_t rows = args.x.size(0);
  std::vector<Tensor> dests;
  if (!args.concat) {
    for (const Tensor& w : args.weights) {
      dests.push_back(new_tensor({rows, w.size(0)}, args.x.options()));
    }
    out.outs = dests;
    return dests;
  }
  int64_t total = 0;
  for (const Tensor& w : args.weights) total += w.size(0);
  const Tensor all = new_tensor({rows, total}, args.x.options());
  int64_t begin = 0;
  for (const Tensor& w : args.weights) {
    dests.push_back(all.narrow(1, begin, w.size(0)));
    begin += w.size(0);
  }
  out.outs = {all};
  return dests;
}

struct LnLinearGroupBackwardArgs {
  // (rows, out_features_i) with unit column stride and row stride grad_outs[i].stride(0) (a
  // column range of the concat output's gradient); undefined where no gradient came
  std::vector<Tensor> grad_outs;
  Tensor x;
  OptTensor ln_weight, ln_bias;
  std::vector<Tensor> weights;
  Tensor mean, rstd;
  Norm norm = Norm::kLayer;
  Quant quant = Quant::kNone;  // kNone or kBitnetOnline (the offline modes have no backward)
};

// dx = N'ᵀ Σ_i grad_outs[i] @ weights[i] (one norm backward for the group), dweights[i] =
// grad_outs[i]ᵀ @ h, dbiases[i] = Σ_rows grad_outs[i]; an empty one is not wanted. A backend may
// replace dx by a tensor of its own (dh itself when N is the identity).
struct LnLinearGroupGrads {
  Tensor dx, dln_weight, dln_bias;
  std::vector<Tensor> dweights, dbiases;
};

#define MAGNETO_BACKEND_KERNELS                                                           \
  struct Kernels {                                                                        \
    static void norm_forward(const NormArgs& args, const NormOutputs& out);               \
    static void norm_backward(const NormBackwardArgs& args, const NormGrads& grads);      \
    /* Allocates out.out and out.preact, writes out.mean and out.rstd. */                 \
    static void ln_linear(const LnLinearArgs& args, LnLinearOutputs& out);                \
    static void ln_linear_backward(const LnLinearBackwardArgs& args, LnLinearGrads& grads); \
    static void dropout(const DropoutArgs& args, const Tensor& y);                        \
    /* Allocates out.outs, writes out.mean and out.rstd. */                               \
    static void ln_linear_group(const LnLinearGroupArgs& args, LnLinearGroupOutputs& out); \
    static void ln_linear_group_backward(const LnLinearGroupBackwardArgs& args,            \
                                         LnLinearGroupGrads& grads);                       \
  };
namespace cpu {
MAGNETO_BACKEND_KERNELS
}  // namespace cpu
namespace cuda {
MAGNETO_BACKEND_KERNELS
}  // namespace cuda
#undef MAGNETO_BACKEND_KERNELS

}  // namespace magneto
