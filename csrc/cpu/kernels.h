// The C++ CPU kernels: row-wise norm forward/backward and the memory-bound passes around the GEMMs
// of ln_linear. The interface is torch-free: raw pointers, sizes, row strides (in elements) and
// the codes of common.h. Tensors are row-major; `dtype` is the element type of every tensor
// argument typed `void*`; norm parameters and reductions are float32.
//
// The implementations use ATen's at::vec and at::parallel_for internally (kernels_impl.h),
// compiled once per instruction set and chosen at run time (dispatch.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace magneto::cpu {

// Row-wise normalisation forward: layer_norm, add_layer_norm and ln_linear's prologue.
// For each of `rows` rows of `cols` elements, in float32:
//   s = x + alpha·residual      (residual optional; s written, rounded, to `sum` when given)
//   a = in_act(s)               (rounded to dtype, as the reference applies it in that dtype)
//   y = N(a)·gamma + beta       (LayerNorm, RMSNorm, or a itself for Norm::kNone; gamma and
//                                beta optional)
// mean[i] (LayerNorm) and rstd[i] (LayerNorm, RMSNorm) are written when the pointers are given.
// A gated input activation (ln_linear only: no residual, no sum) reads rows of x 2·cols wide,
// x = [gate | up], and a = act(gate)·up in float32, rounded to dtype once.
struct NormForward {
  DType dtype = DType::kFloat32;
  Norm norm = Norm::kLayer;
  Activation input_activation = Activation::kNone;
  int64_t rows = 0, cols = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  float alpha = 1.0f;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  float eps = 1e-5f;
  void* y = nullptr;  // null: the statistics alone (norm_stats)
  int64_t y_stride = 0;
  void* sum = nullptr;
  int64_t sum_stride = 0;
  float* mean = nullptr;
  float* rstd = nullptr;
  float* m2 = nullptr;  // the row's Σ(a − mean)² (Σa² for RMSNorm), the sharded norm's partial
};
void norm_forward(const NormForward& args);

// Row-wise normalisation backward, fused with ln_linear's input-activation derivative and with the
// recompute of h that the weight gradient needs (this sweep reads x anyway, so h costs one write
// and no extra read). With a = in_act(x), xhat = (a − mean)·rstd (a·rstd for RMSNorm, a for
// Norm::kNone), g = dy⊙gamma, mean_g = mean_row(g) and mean_gxhat = mean_row(g⊙xhat):
//   da = rstd·(g − mean_g − xhat·mean_gxhat)                 (RMSNorm drops mean_g;
//                                                             Norm::kNone: da = dy)
//   dx = da⊙in_act'(x) + grad_accum                           (grad_accum optional)
//   dgamma = Σ_rows dy⊙xhat,  dbeta = Σ_rows dy                (float32, deterministic: fixed
//                                                             row chunks, then a fixed-order sum)
//   h = xhat·gamma + beta rounded to dtype                    (optional: the GEMM operand N(a))
// dy may be null when only h is wanted. Every output pointer is optional. dx may be dy itself
// (same pointer and stride): each row of dy is read before the same row of dx is written.
// A gated input activation (no grad_accum) reads rows of x 2·cols wide, x = [gate | up] as for
// NormForward, and writes rows of dx 2·cols wide, dx = [da⊙up⊙act'(gate) | da⊙act(gate)]; dx is
// then never dy.
struct NormBackward {
  DType dtype = DType::kFloat32;
  Norm norm = Norm::kLayer;
  Activation input_activation = Activation::kNone;
  int64_t rows = 0, cols = 0;
  const void* dy = nullptr;
  int64_t dy_stride = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const float* mean = nullptr;
  const float* rstd = nullptr;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  const void* grad_accum = nullptr;
  int64_t grad_accum_stride = 0;
  void* dx = nullptr;
  int64_t dx_stride = 0;
  float* dgamma = nullptr;
  float* dbeta = nullptr;
  void* h = nullptr;
  int64_t h_stride = 0;
  // The sharded norm (2 per row [Σg, Σg⊙xhat], 1 for RMSNorm [Σg⊙xhat]): row_sums,
  // this row's sums, written; row_means, the means over the whole row (every shard), read for dx
  // instead of this row's own.
  float* row_sums = nullptr;
  const float* row_means = nullptr;
};
void norm_backward(const NormBackward& args);

// ln_linear's output pass over the GEMM result preact (bias already added by the GEMM):
//   out = alpha·residual + dropout(act(preact))
// residual optional; dropout keeps element (i, j) iff philox(seed, i·cols + j) >=
// dropout_threshold(p) and scales kept ones by 1/(1−p). `out` may be `preact` itself.
struct LinearEpilogue {
  DType dtype = DType::kFloat32;
  Activation activation = Activation::kNone;
  int64_t rows = 0, cols = 0;
  const void* preact = nullptr;
  int64_t preact_stride = 0;
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  float alpha = 1.0f;
  uint64_t seed = 0;
  double dropout_p = 0.0;
  void* out = nullptr;
  int64_t out_stride = 0;
};
void linear_epilogue(const LinearEpilogue& args);

// out = alpha·residual + bias (bias broadcast over rows, optional): the accumulator the row-blocked
// ln_linear forward's GEMMs add h @ weight^T into, when the output has no activation and no
// dropout.
void residual_bias_init(DType dtype, int64_t rows, int64_t cols, const void* residual,
                        int64_t residual_stride, float alpha, const void* bias, void* out,
                        int64_t out_stride);

// The dz pass, ln_linear's backward pass over the output gradient:
//   dz = dy ⊙ keep/(1−p) ⊙ act'(preact)      (written when dz is given)
//   dbias = Σ_rows dz                        (float32, deterministic, when dbias is given)
// preact is read only when activation != kNone.
struct LinearEpilogueBackward {
  DType dtype = DType::kFloat32;
  Activation activation = Activation::kNone;
  int64_t rows = 0, cols = 0;
  const void* dy = nullptr;
  int64_t dy_stride = 0;
  const void* preact = nullptr;
  int64_t preact_stride = 0;
  uint64_t seed = 0;
  double dropout_p = 0.0;
  void* dz = nullptr;
  int64_t dz_stride = 0;
  float* dbias = nullptr;
};
void linear_epilogue_backward(const LinearEpilogueBackward& args);

// y = x @ weight^T + bias (bias optional), for a few rows of x: the decode-size GEMM, in float32,
// bf16 or fp16 (x, weight, bias and y of one dtype; products accumulated in float32, y rounded
// once). Each pair of weight rows is read from memory once and dotted with every row of x, a
// tile of 8 rows (AVX-512) or 4 (AVX2) at a time while the pair stays in L1 (x, as float32,
// stays in L1/L2), so up to 8 rows run at the memory bandwidth of the weight; BLAS GEMMs pack
// the weight first, which at 2-16 rows costs more than the arithmetic (docs/design.md,
// Decisions). Every output element is one fixed-order dot product, so results do not depend on
// the number of threads. Only the AVX2 and AVX-512 builds have it: linear_few_rows_max() is the
// most rows it is used for with the build chosen, 0 for the portable one (whose at::vec is
// scalar code, slower than the BLAS).
struct LinearFewRows {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, in_features = 0, out_features = 0;
  const void* x = nullptr;  // rows × in_features, row stride x_stride
  int64_t x_stride = 0;
  const void* weight = nullptr;  // out_features × in_features, row stride weight_stride
  int64_t weight_stride = 0;
  const void* bias = nullptr;
  void* y = nullptr;  // rows × out_features, row stride y_stride
  int64_t y_stride = 0;
};
void linear_few_rows(const LinearFewRows& args);
int64_t linear_few_rows_max();

// BitNet b1.58's offline quantised projection (csrc/cpu/quant.h), in two steps:
// quantize_rows, per row of h (rows × cols, dtype), in float32 as transformers' ActQuant:
//   s = 127 / max(max_k |h_k|, 1e-5),  q_k = round_half_even(h_k·s) clamped to [−128, 127]
// writing q (int8, rows × cols), q_sum = Σ_k q_k (int32) and s (float32) per row;
// quant_linear, acc = Σ_k q_k·t_nk = Σ_k q_k·c_nk − q_sum (int32, exact) against the packed
// codes c = t + 1 (common.h's layout), then per element in float32, rounded to dtype:
//   Quant::kBitnetOffline  preact = (acc / s + bias)·weight_scale     (AutoBitLinear)
//   Quant::kBitlinear      preact = round(acc) / (weight_scale·round(s)) + bias   (BitLinear:
//                          its GEMM output and s in dtype, the bias added in dtype)
// The dot products run on u8×s8 multiply-adds (AVX2 maddubs; AVX-512 VNNI vpdpbusd where the
// CPU has it; a portable loop), threads over blocks of output features, each weight row read
// once per block of rows.
struct QuantizeRows {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  const void* h = nullptr;  // row stride cols
  int8_t* q = nullptr;      // row stride cols
  int32_t* q_sum = nullptr;
  float* scale = nullptr;
};
void quantize_rows(const QuantizeRows& args);

struct QuantLinear {
  DType dtype = DType::kFloat32;
  Quant quant = Quant::kBitnetOffline;
  int64_t rows = 0, in_features = 0, out_features = 0;
  const int8_t* q = nullptr;  // rows × in_features
  const int32_t* q_sum = nullptr;
  const float* scale = nullptr;
  const uint8_t* weight = nullptr;  // out_features × in_features / 4, packed
  float weight_scale = 1.0f;
  const void* bias = nullptr;  // out_features, dtype; optional
  void* preact = nullptr;      // rows × out_features, dtype, row stride preact_stride
  int64_t preact_stride = 0;   // >= out_features: a column range of a wider output
};
void quant_linear(const QuantLinear& args);

// The int8 output projection (csrc/cpu/int8_head.h): per element, in float32,
//   y[i][n] = (Σ_k x[i][k]·weight[n][k])·scale[n] (+ bias[n]),  rounded to dtype once
// x (rows × in_features, row stride x_stride), scale, bias and y (rows × out_features, row stride
// y_stride) in dtype; weight int8, out_features × in_features, contiguous. Every build has it
// (the portable one as at::vec's scalar code).
struct Int8Head {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, in_features = 0, out_features = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const int8_t* weight = nullptr;
  const void* scale = nullptr;
  const void* bias = nullptr;  // optional
  void* y = nullptr;
  int64_t y_stride = 0;
};
void int8_head(const Int8Head& args);

// Which instruction set the kernels run with ("avx512", "avx2" or "default").
const char* capability();

// The builds this CPU can run, widest first: a subset of "avx512", "avx2", "default".
std::vector<std::string> supported_isas();

// Chooses the build the kernels run with: `request` is MAGNETO_CPU_ISA's value (null, "" or
// "auto": the widest the CPU supports). A build the CPU lacks falls back to the widest one below
// it, and `note` says so; an unknown name leaves the choice alone, sets valid = false and `note`
// to the error. Call before the first kernel runs (the bindings do, at import).
struct IsaSelection {
  bool valid = true;
  std::string note;
};
IsaSelection select_isa(const char* request);

}  // namespace magneto::cpu
