// Launchers of magneto's CUDA kernels. Torch-free: raw pointers, sizes, row strides, the codes of
// csrc/common.h and a stream, so that nvcc compiles them without torch (tools/check_cuda.py);
// csrc/checks.cpp does all tensor checking, csrc/ops.h the allocation, and csrc/cuda/backend.cpp
// fills these structs.
//
// Conventions shared by every launcher
// - Matrices are row-major (rows, cols) with a row stride in elements (>= cols); vectors
//   (gamma, beta, bias, mean, rstd) are contiguous. Element types: `dtype` for activations,
//   `param_dtype` (== dtype or kFloat32) for the norm's gamma/beta; statistics (mean, rstd) are
//   always float32.
// - Optional inputs and outputs are null pointers when absent.
// - Every launcher returns a Status: nullptr on success, otherwise a static, human-readable
//   message (invalid arguments, or the cudaGetErrorString of the launch error, checked with
//   cudaGetLastError after the launches). Never free it. Callers: TORCH_CHECK(!status, status).
// - All work is enqueued on `stream`; nothing synchronises.
// - 16-byte vector loads/stores are used when every pointer of a launch is 16-byte aligned and
//   every row stride is a multiple of 16 bytes; otherwise the same kernels take a scalar path.
//   Odd widths are fine (a scalar tail covers the last partial vector).
// - Reductions over rows (dgamma, dbeta, dbias) are deterministic: per-block partial sums written
//   to a caller-provided float32 workspace, then a fixed-order sum kernel. No atomics. The
//   workspace size comes from the matching *_workspace_bytes function (it depends on the current
//   device's SM count, so ask on the device the launch runs on).
//
// The GEMMs of ln_linear are not here: csrc/cuda/backend.cpp calls cuBLAS(Lt) through
// at::mm/addmm, with these kernels as prologue (norm_forward writing N(in_act(x)) in the GEMM
// operand's dtype) and epilogue (linear_epilogue: bias, activation, dropout, alpha-scaled residual
// in one pass), and in backward linear_epilogue_backward (dz and dbias) before the two GEMMs and
// norm_backward after. cuBLAS is the fastest GEMM available on every architecture without our own
// tuning, and the memory-bound work around it runs at copy bandwidth in single passes. A CUTLASS
// GEMM with the norm applied in its main loop (or folded into its epilogue; docs/design.md,
// Kernels per backend) would save the round trip of the normalised operand through HBM; it is
// future work that needs measurement on the GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace magneto {
namespace cuda {

using Status = const char*;  // nullptr on success, else a static message

// ------------------------------------------------------------------------------ norm forward
// Per row r (all math in float32):
//   s = x                     (residual == nullptr)
//   s = alpha*residual + x    (residual != nullptr; written, rounded to dtype, to `sum` if given)
//   a = round_dtype(in_act(s))            (input_activation; identity for kNone)
//   gated input_activation (common.h; no residual then): x's rows are 2*cols wide, [gate | up],
//   and a = round_dtype(act(gate)*up) with gate = x[r, c], up = x[r, cols + c]
//   kLayer: mean = avg(a), rstd = 1/sqrt(avg((a-mean)^2) + eps), y = (a-mean)*rstd*gamma + beta
//   kRms:   rstd = 1/sqrt(avg(a^2) + eps),                        y = a*rstd*gamma
//   kNone:  y = a   (no statistics; gamma and beta must be null)
// gamma = 1 and beta = 0 when null. y, sum: dtype; mean, rstd: float32 (mean only for
// kLayer). With saved_rstd (and saved_mean
// for kLayer) given, those statistics are applied instead of computed: ln_linear's backward
// recomputes its GEMM operand h = N(in_act(x)) this way (no residual allowed then).
// Widths up to 32768 (16-bit dtypes) / 16384 (float32) keep the row in registers (warp per row
// for narrow rows, up to 512 threads per row for wide ones, exact two-pass statistics); wider
// rows use a block per row with Welford statistics and a second read of the row.
// Outputs must not alias inputs.
struct NormForwardParams {
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  float alpha = 1.0f;
  const void* gamma = nullptr;  // (cols,) param_dtype
  const void* beta = nullptr;   // (cols,) param_dtype; kLayer only
  const float* saved_mean = nullptr;
  const float* saved_rstd = nullptr;
  void* y = nullptr;
  int64_t y_stride = 0;
  void* sum = nullptr;
  int64_t sum_stride = 0;
  float* mean = nullptr;  // (rows,) written when non-null (kLayer)
  float* rstd = nullptr;  // (rows,) written when non-null (kLayer, kRms)
  // (rows,) the row's sum of squared deviations (of squares for kRms), written when non-null:
  // norm_stats, the sharded norm's partials (y may then be null)
  float* m2 = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-5f;
  Norm norm = Norm::kLayer;
  Activation input_activation = Activation::kNone;
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
};
Status norm_forward(const NormForwardParams& p, cudaStream_t stream);

// ------------------------------------------------------------------------------ norm backward
// Gradient of y = N(in_act(x)) (x being s for add_layer_norm), with a = round_dtype(in_act(x)):
//   xhat = (a - mean)*rstd (kLayer) | a*rstd (kRms);  g = dy*gamma
//   mean_g = avg(g), mean_gxhat = avg(g*xhat)
//   kLayer: da = rstd*(g - mean_g - xhat*mean_gxhat)
//   kRms:   da = rstd*(g - xhat*mean_gxhat)
//   kNone:  da = dy
//   dx = da * in_act'(x) + grad_accum          (grad_accum optional, dtype)
//   gated input_activation (a = act(gate)*up as in norm_forward; no grad_accum): x and dx rows
//   are 2*cols wide, dx = [da*up*act'(gate) | da*act(gate)]
//   dgamma = sum_rows(dy*xhat), dbeta = sum_rows(dy)   (param_dtype, optional, deterministic)
// dx may be null when only parameter gradients are wanted. dgamma/dbeta need a float32
// workspace of norm_backward_workspace_bytes(...) bytes (0 when neither is requested); with
// rows == 0 they are written as zeros. Outputs must not alias inputs.
// Widths up to 8192 run one fused kernel (row in registers, per-thread column partials); wider
// rows run a block-per-row dx kernel plus a column-partials kernel.
struct NormBackwardParams {
  const void* dy = nullptr;
  int64_t dy_stride = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* gamma = nullptr;  // (cols,) param_dtype or null
  const float* mean = nullptr;  // (rows,) kLayer
  const float* rstd = nullptr;  // (rows,) kLayer, kRms
  const void* grad_accum = nullptr;
  int64_t grad_accum_stride = 0;
  void* dx = nullptr;
  int64_t dx_stride = 0;
  void* dgamma = nullptr;  // (cols,) param_dtype
  void* dbeta = nullptr;   // (cols,) param_dtype; kLayer only
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // The sharded norm (2 floats a row, [sum or mean of g, of g*xhat]; 1 for kRms, [of g*xhat]):
  // row_sums, this row's sums, written; row_means, the whole row's (every shard), used for dx
  // instead of this row's own.
  float* row_sums = nullptr;
  const float* row_means = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  Norm norm = Norm::kLayer;
  Activation input_activation = Activation::kNone;
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
};
// Bytes of float32 workspace norm_backward needs for these sizes on the current device
// (0 when want_dgamma and want_dbeta are both false).
size_t norm_backward_workspace_bytes(int64_t rows, int64_t cols, DType dtype,
                                     Activation input_activation, bool want_dgamma,
                                     bool want_dbeta);
Status norm_backward(const NormBackwardParams& p, cudaStream_t stream);

// ------------------------------------------------------------------------------ linear epilogue
// One pass over the GEMM's product (rows, cols) = N(in_act(x)) @ W^T (product_dtype: dtype or
// float32):
//   preact = round_dtype(product + bias)   (the reference's dtype GEMM output; written to
//                                            `preact` if given)
//   v = act(preact);  v = keep ? v*dropout_scale : 0,
//                     keep = philox(seed, r*cols + c) >= threshold
//   out = alpha*residual + v      (no residual: out = v)
// Computed in float32 from preact on, rounded once to dtype. seed is a device pointer to the
// int64 seed (null: no dropout). out may alias product (when product_dtype == dtype and strides
// match) or residual.
struct LinearEpilogueParams {
  const void* product = nullptr;
  int64_t product_stride = 0;
  DType product_dtype = DType::kFloat32;
  const void* bias = nullptr;  // (cols,) dtype
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  float alpha = 1.0f;
  const int64_t* seed = nullptr;
  uint32_t dropout_threshold = 0;  // magneto::dropout_threshold(p)
  float dropout_scale = 1.0f;      // 1/(1-p)
  void* out = nullptr;
  int64_t out_stride = 0;
  void* preact = nullptr;
  int64_t preact_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  Activation activation = Activation::kNone;
  DType dtype = DType::kFloat32;
};
Status linear_epilogue(const LinearEpilogueParams& p, cudaStream_t stream);

// --------------------------------------------------------------------- linear epilogue backward
// dz = dy * (keep ? dropout_scale : 0) * act'(preact)   (preact needed when activation != kNone;
// keep as in linear_epilogue), written in dtype; dz may alias dy. dbias = sum_rows(dz) in dtype
// (optional; float32 workspace of linear_epilogue_backward_workspace_bytes bytes; deterministic).
// The column sum uses the float32 dz before rounding.
struct LinearEpilogueBackwardParams {
  const void* dy = nullptr;
  int64_t dy_stride = 0;
  const void* preact = nullptr;
  int64_t preact_stride = 0;
  const int64_t* seed = nullptr;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.0f;
  void* dz = nullptr;
  int64_t dz_stride = 0;
  void* dbias = nullptr;  // (cols,) dtype
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  Activation activation = Activation::kNone;
  DType dtype = DType::kFloat32;
};
size_t linear_epilogue_backward_workspace_bytes(int64_t rows, int64_t cols, DType dtype,
                                                bool want_dbias);
Status linear_epilogue_backward(const LinearEpilogueBackwardParams& p, cudaStream_t stream);

// ------------------------------------------------------------------------ quantised projection
// BitNet b1.58's quantised ln_linear (magneto_kernels/quant.py is the specification).
//
// quantize_rows: per row r, h = N(in_act(x)) as norm_forward computes and rounds it (norm kRms
// or kNone; input_activation kNone or kRelu2Glu, x then 2*cols wide), never written; then in
// float32 s = 127 / max(max_k |h_k|, 1e-5) and q_k = clamp(rint(h_k*s), -128, 127). Writes
// either the offline modes' operand: q (int8, row stride cols), q_sum = sum_k q_k (int32) and
// scale = s, or (fake != null) the online mode's fake-quantised row fake = round_dtype(q / s)
// (row stride cols). rstd (kRms) written when non-null; with saved_rstd given, that one is
// applied instead (the online backward's recompute of fake, then bitwise the forward's).
struct QuantizeRowsParams {
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* gamma = nullptr;  // (cols,) param_dtype; kRms only
  const float* saved_rstd = nullptr;
  const float* amax = nullptr;  // (rows,): given (tensor parallelism's max|h| over every shard)
  int8_t* q = nullptr;
  int32_t* q_sum = nullptr;  // (rows,)
  float* scale = nullptr;    // (rows,)
  void* fake = nullptr;
  float* rstd = nullptr;  // (rows,)
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
  Norm norm = Norm::kRms;
  Activation input_activation = Activation::kNone;
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
};
Status quantize_rows(const QuantizeRowsParams& p, cudaStream_t stream);

// quant_linear: the offline modes' projection of quantize_rows' output against the packed weight
// (out_features, in_features/4) uint8 of common.h's layout (16-byte aligned; in_features a
// multiple of kQuantPackUnit): acc = sum_k q_k*t_k, exact in int32, then in float32 with
// ws = *weight_scale (a device pointer) and s = scale[r], rounded to dtype as the spec's steps:
//   kBitnetOffline: preact = round((acc/s + bias)*ws)
//   kBitlinear:     preact = round(round(round(acc) / (ws*round(s))) + bias)
//   out = round(alpha*residual + preact)   (no residual: out = preact)
// Up to kQuantGemvRows rows run a warp-per-output-feature kernel (decode), more a tiled one.
struct QuantLinearParams {
  const int8_t* q = nullptr;       // (rows, in_features)
  const int32_t* q_sum = nullptr;  // (rows,)
  const float* scale = nullptr;    // (rows,)
  const uint8_t* weight = nullptr;
  const float* weight_scale = nullptr;  // (1,)
  const void* bias = nullptr;           // (out_features,) dtype
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  float alpha = 1.0f;
  void* out = nullptr;
  int64_t out_stride = 0;
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  Quant quant = Quant::kBitnetOffline;
  DType dtype = DType::kFloat32;
};
inline constexpr int64_t kQuantGemvRows = 16;
Status quant_linear(const QuantLinearParams& p, cudaStream_t stream);

// The online mode's weight (transformers' WeightQuant): s_w = 1 / max(mean_k |W|, 1e-5) over the
// whole (numel,) tensor in float32 (a deterministic two-stage sum: per-block partials in the
// float32 workspace of fake_quant_weight_workspace_bytes bytes, then one block in fixed order),
// fake = round_dtype(clamp(rint(W*s_w), -1, 1) / s_w). absmean given (a (1,) float32 device
// pointer: tensor parallelism's whole weight's mean|W|): s_w from it, no sum, no workspace.
struct FakeQuantWeightParams {
  const void* weight = nullptr;
  const float* absmean = nullptr;
  void* fake = nullptr;
  int64_t numel = 0;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  DType dtype = DType::kFloat32;
};
size_t fake_quant_weight_workspace_bytes(int64_t numel);
Status fake_quant_weight(const FakeQuantWeightParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace magneto
