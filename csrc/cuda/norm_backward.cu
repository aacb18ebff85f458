// Norm backward: dx (with the input activation's derivative and an optional gradient to add),
// and dgamma/dbeta reduced over rows in two deterministic stages.
//
// Rows up to 8192 wide: norm_backward_rows keeps the row of x and dy in registers (row groups of
// 32..512 threads as in norm_forward_rows) and loops over rows, each thread accumulating
// dgamma/dbeta partials for the columns it owns in registers; at the end the row groups of a
// block add theirs in shared memory and the block writes one partial row to the workspace.
// Wider rows: norm_backward_wide_dx (a block per row, two reads) and norm_backward_columns
// (a tile of 32 vectors x 8 rows per block, looping down a chunk of rows) for the partials;
// these two take the input activation as a runtime switch (whether it is gated, a template flag).
// A gated input activation (x = [gate | up], rows of 2*cols) reads both halves of x and writes
// both halves of dx; a = act(gate)*up is recomputed from them, never stored. The register kernel
// holds only dy (and the partials) of a gated row: it reads the halves for the row sums and again
// for dx (then mostly from L1/L2).
// Stage two is column_sum (reduce.cu) over the partial rows.
#include "cuda/common.cuh"

namespace magneto {
namespace cuda {
namespace detail {
namespace {

constexpr int kRowsBlockMin = 256;  // threads per block of the register kernel, at least
constexpr int kWideThreads = 512;
constexpr int kColumnTileX = 32;    // vectors per column tile
constexpr int kColumnTileY = 8;     // rows processed side by side in a column tile
constexpr int kRegisterFloats = 16;  // floats per thread per cached row array (x, dy, partials)

// a = round(in_act(x)) and xhat = (a - mean)*rstd.
template <typename T, Activation ACT>
__device__ __forceinline__ float normalized(float x, float mean, float rstd, Activation runtime) {
  const float a = has_activation<ACT>(runtime) ? round_to<T>(activation<ACT>(x, runtime)) : x;
  return (a - mean) * rstd;
}

// The gate and up halves of VEC columns at c0 of row `row` of a gated x (x = [gate | up]).
template <typename T>
__device__ __forceinline__ void load_halves(const NormBackwardParams& p, int64_t row, int c0,
                                            int valid, bool vec_ok, float (&gate)[kVec<T>],
                                            float (&up)[kVec<T>]) {
  constexpr int VEC = kVec<T>;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride + c0;
  load_vec<T, VEC>(x, valid, vec_ok, gate);
  load_vec<T, VEC>(x + p.cols, valid, vec_ok, up);  // missing elements: act(0)*0 = 0
}

// a = gated_act(gate, up) for VEC columns at c0 of row `row` of a gated x. A: the gate's
// activation, or kRuntimeActivation for the code `runtime`.
template <typename T, Activation A>
__device__ __forceinline__ void load_gated_act(const NormBackwardParams& p, int64_t row, int c0,
                                               int valid, bool vec_ok, Activation runtime,
                                               float (&a)[kVec<T>]) {
  constexpr int VEC = kVec<T>;
  float gate[VEC], up[VEC];
  load_halves<T>(p, row, c0, valid, vec_ok, gate, up);
#pragma unroll
  for (int i = 0; i < VEC; ++i) a[i] = gated_act<T, A>(gate[i], up[i], runtime);
}

// dx for VEC columns from the row's reduced means mean_g = avg(g), mean_gxhat = avg(g*xhat).
template <typename T, Activation ACT>
__device__ __forceinline__ void store_dx(const NormBackwardParams& p, int64_t row, int c0,
                                         int valid, bool vec_ok, float mean, float rstd,
                                         float mean_g, float mean_gxhat, const float (&x)[kVec<T>],
                                         const float (&dy)[kVec<T>]) {
  constexpr int VEC = kVec<T>;
  float w[VEC], acc[VEC], dx[VEC];
  load_param<T, VEC>(p.gamma, p.param_dtype == DType::kFloat32, c0, valid, vec_ok, 1.0f, w);
  if (p.grad_accum != nullptr) {
    load_vec<T, VEC>(static_cast<const T*>(p.grad_accum) + row * p.grad_accum_stride + c0, valid,
                     vec_ok, acc);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
  }
  const bool has_norm = p.norm != Norm::kNone;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float da = dy[i];
    if (has_norm) {
      const float xhat = normalized<T, ACT>(x[i], mean, rstd, p.input_activation);
      da = rstd * (dy[i] * w[i] - mean_g - xhat * mean_gxhat);
    }
    dx[i] = fmaf(da, activation_derivative<ACT>(x[i], p.input_activation), acc[i]);
  }
  store_vec<T, VEC>(static_cast<T*>(p.dx) + row * p.dx_stride + c0, valid, vec_ok, dx);
}

// store_dx for a gated row (no grad_accum), reading its two halves of x: dgate = da*up*act'(gate)
// at column c0 of dx's row, dup = da*act(gate) cols columns further. One half after the other:
// fewer values live at once (the register kernel is at its limit).
template <typename T, Activation A>
__device__ __forceinline__ void store_dx_gated(const NormBackwardParams& p, int64_t row, int c0,
                                               int valid, bool vec_ok, float mean, float rstd,
                                               float mean_g, float mean_gxhat, Activation runtime,
                                               const float (&dy)[kVec<T>]) {
  constexpr int VEC = kVec<T>;
  float gate[VEC], up[VEC], w[VEC], da[VEC], d[VEC];
  load_halves<T>(p, row, c0, valid, vec_ok, gate, up);
  load_param<T, VEC>(p.gamma, p.param_dtype == DType::kFloat32, c0, valid, vec_ok, 1.0f, w);
  const bool has_norm = p.norm != Norm::kNone;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    da[i] = dy[i];
    if (has_norm) {
      const float xhat = (gated_act<T, A>(gate[i], up[i], runtime) - mean) * rstd;
      da[i] = rstd * (dy[i] * w[i] - mean_g - xhat * mean_gxhat);
    }
  }
  T* dx = static_cast<T*>(p.dx) + row * p.dx_stride + c0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) d[i] = da[i] * up[i] * activation_derivative<A>(gate[i], runtime);
  store_vec<T, VEC>(dx, valid, vec_ok, d);
#pragma unroll
  for (int i = 0; i < VEC; ++i) d[i] = da[i] * activation<A>(gate[i], runtime);
  store_vec<T, VEC>(dx + p.cols, valid, vec_ok, d);
}

// The sharded norm: this row's sums (sums.x of g, sums.y of g*xhat) to p.row_sums by the
// `writer` thread, and the whole row's means from p.row_means in place of the row's own.
__device__ __forceinline__ void sharded_row_sums(const NormBackwardParams& p, int64_t row,
                                                 bool layer, bool writer, float2 sums,
                                                 float& mean_g, float& mean_gxhat) {
  const int64_t k = layer ? 2 : 1;
  if (writer && p.row_sums != nullptr) {
    if (layer) p.row_sums[row * k] = sums.x;
    p.row_sums[row * k + k - 1] = sums.y;
  }
  if (p.row_means != nullptr) {
    if (layer) mean_g = p.row_means[row * k];
    mean_gxhat = p.row_means[row * k + k - 1];
  }
}

// Writes this block's partial row of `dst` ([gridDim.x, cols]) from the per-thread accumulators,
// first adding up the row groups of the block in shared memory (fixed order). Block-uniform.
template <int NV, int VEC>
__device__ __forceinline__ void write_partials(float (&acc)[NV][VEC], float* dst, int tpr,
                                               int cols, float* shared) {
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int rows_per_block = static_cast<int>(blockDim.x) / tpr;
  if (rows_per_block > 1) {
    __syncthreads();  // a previous call's readers are done with `shared`
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int i = 0; i < VEC; ++i) shared[(j * VEC + i) * blockDim.x + threadIdx.x] = acc[j][i];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < tpr) {
#pragma unroll
      for (int j = 0; j < NV; ++j)
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float s = 0.0f;
          for (int g = 0; g < rows_per_block; ++g)
            s += shared[(j * VEC + i) * blockDim.x + g * tpr + lane];
          acc[j][i] = s;
        }
    }
  }
  if (static_cast<int>(threadIdx.x) < tpr) {
    float* out = dst + static_cast<int64_t>(blockIdx.x) * cols;
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int col = (j * tpr + lane) * VEC + i;
        if (col < cols) out[col] = acc[j][i];
      }
  }
}

template <typename T, Activation ACT, int NV>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    norm_backward_rows(const NormBackwardParams p, int tpr, bool vec_ok, float* dgamma_part,
                       float* dbeta_part) {
  constexpr int VEC = kVec<T>;
  constexpr Activation A = gate_of(ACT);
  constexpr bool GATED = is_gated(ACT);
  __shared__ float2 red[2][kMaxThreadsPerRow / kWarp];
  // blockDim.x*NV*VEC floats when > 1 row per block
  float* const shared_partials = dynamic_shared<float>();
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int rows_per_block = static_cast<int>(blockDim.x) / tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const int cols = static_cast<int>(p.cols);
  const float inv_cols = 1.0f / static_cast<float>(cols);
  const bool has_norm = p.norm != Norm::kNone;
  const bool layer = p.norm == Norm::kLayer;
  const bool param_f32 = p.param_dtype == DType::kFloat32;

  float acc_dgamma[NV][VEC], acc_dbeta[NV][VEC];
#pragma unroll
  for (int j = 0; j < NV; ++j)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_dgamma[j][i] = acc_dbeta[j][i] = 0.0f;

  int parity = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block, parity ^= 1) {
    const int64_t row = base + group;
    const bool active = row < p.rows;  // inactive groups still join the block's reductions
    // GATED: x is not held (the halves are read where a is needed, for the sums and for dx):
    // a next to dy and the partials would not fit the registers.
    float x[NV][VEC], dy[NV][VEC];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c0 = (j * tpr + lane) * VEC;
      const int valid = active ? cols - c0 : 0;  // missing elements load as zero
      if constexpr (!GATED)
        load_vec<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + c0, valid, vec_ok, x[j]);
      load_vec<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + c0, valid, vec_ok, dy[j]);
    }
    float mean = 0.0f, rstd = 1.0f, mean_g = 0.0f, mean_gxhat = 0.0f;
    if (has_norm) {
      if (active) {
        rstd = p.rstd[row];
        if (layer) mean = p.mean[row];
      }
      float sg = 0.0f, sgx = 0.0f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c0 = (j * tpr + lane) * VEC;
        float w[VEC], a[VEC];
        load_param<T, VEC>(p.gamma, param_f32, c0, active ? cols - c0 : 0, vec_ok, 1.0f, w);
        if constexpr (GATED)
          load_gated_act<T, A>(p, row, c0, active ? cols - c0 : 0, vec_ok, p.input_activation, a);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xhat = GATED ? (a[i] - mean) * rstd
                                   : normalized<T, A>(x[j][i], mean, rstd, p.input_activation);
          const float g = dy[j][i] * w[i];  // zero for missing elements (dy is zero there)
          sg += g;
          sgx += g * xhat;
          acc_dgamma[j][i] = fmaf(dy[j][i], xhat, acc_dgamma[j][i]);
          acc_dbeta[j][i] += dy[j][i];
        }
      }
      const float2 sums = group_sum2(sg, sgx, tpr, red[parity]);
      mean_g = layer ? sums.x * inv_cols : 0.0f;
      mean_gxhat = sums.y * inv_cols;
      if (active) sharded_row_sums(p, row, layer, lane == 0, sums, mean_g, mean_gxhat);
    }
    if (p.dx != nullptr && active) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c0 = (j * tpr + lane) * VEC;
        if (c0 >= cols) continue;
        if constexpr (GATED) {
          store_dx_gated<T, A>(p, row, c0, cols - c0, vec_ok, mean, rstd, mean_g, mean_gxhat,
                               p.input_activation, dy[j]);
        } else {
          store_dx<T, A>(p, row, c0, cols - c0, vec_ok, mean, rstd, mean_g, mean_gxhat, x[j],
                         dy[j]);
        }
      }
    }
  }
  if (dgamma_part != nullptr)
    write_partials<NV, VEC>(acc_dgamma, dgamma_part, tpr, cols, shared_partials);
  if (dbeta_part != nullptr)
    write_partials<NV, VEC>(acc_dbeta, dbeta_part, tpr, cols, shared_partials);
}

template <typename T, bool GATED>
__global__ void __launch_bounds__(kWideThreads) norm_backward_wide_dx(const NormBackwardParams p,
                                                                      bool vec_ok) {
  constexpr int VEC = kVec<T>;
  __shared__ float2 red[kWideThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int cols = static_cast<int>(p.cols);
  const int nvec = static_cast<int>(ceil_div(cols, VEC));
  const bool layer = p.norm == Norm::kLayer;
  const T* x_row = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* dy_row = static_cast<const T*>(p.dy) + row * p.dy_stride;
  float mean = 0.0f, rstd = 1.0f, mean_g = 0.0f, mean_gxhat = 0.0f;
  if (p.norm != Norm::kNone) {
    rstd = p.rstd[row];
    if (layer) mean = p.mean[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int c0 = v * VEC;
      float x[VEC], dy[VEC], w[VEC];
      if constexpr (GATED) {  // x holds a
        load_gated_act<T, kRuntimeActivation>(p, row, c0, cols - c0, vec_ok,
                                              gate_of(p.input_activation), x);
      } else {
        load_vec<T, VEC>(x_row + c0, cols - c0, vec_ok, x);
      }
      load_vec<T, VEC>(dy_row + c0, cols - c0, vec_ok, dy);
      load_param<T, VEC>(p.gamma, p.param_dtype == DType::kFloat32, c0, cols - c0, vec_ok, 1.0f,
                         w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = dy[i] * w[i];
        sg += g;
        sgx += g * (GATED ? (x[i] - mean) * rstd
                          : normalized<T, kRuntimeActivation>(x[i], mean, rstd,
                                                              p.input_activation));
      }
    }
    const float2 sums = group_sum2(sg, sgx, blockDim.x, red);
    mean_g = layer ? sums.x / static_cast<float>(cols) : 0.0f;
    mean_gxhat = sums.y / static_cast<float>(cols);
    sharded_row_sums(p, row, layer, threadIdx.x == 0, sums, mean_g, mean_gxhat);
  }
  if (p.dx == nullptr) return;  // the row sums alone
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int c0 = v * VEC;
    float x[VEC], dy[VEC];
    if constexpr (GATED) {
      load_vec<T, VEC>(dy_row + c0, cols - c0, vec_ok, dy);
      store_dx_gated<T, kRuntimeActivation>(p, row, c0, cols - c0, vec_ok, mean, rstd, mean_g,
                                            mean_gxhat, gate_of(p.input_activation), dy);
    } else {
      load_vec<T, VEC>(x_row + c0, cols - c0, vec_ok, x);
      load_vec<T, VEC>(dy_row + c0, cols - c0, vec_ok, dy);
      store_dx<T, kRuntimeActivation>(p, row, c0, cols - c0, vec_ok, mean, rstd, mean_g,
                                      mean_gxhat, x, dy);
    }
  }
}

// Partial dgamma/dbeta over a chunk of rows for a tile of kColumnTileX vectors: thread (tx, ty)
// owns vector blockIdx.x*kColumnTileX + tx and rows ty, ty + kColumnTileY, ... of chunk
// blockIdx.y (chunks interleave with stride gridDim.y*kColumnTileY).
template <typename T, bool GATED>
__global__ void __launch_bounds__(kColumnTileX* kColumnTileY)
    norm_backward_columns(const NormBackwardParams p, bool vec_ok, float* dgamma_part,
                          float* dbeta_part) {
  constexpr int VEC = kVec<T>;
  __shared__ float tile[kColumnTileY][kColumnTileX * VEC];
  const int cols = static_cast<int>(p.cols);
  const int c0 =
      (static_cast<int>(blockIdx.x) * kColumnTileX + static_cast<int>(threadIdx.x)) * VEC;
  const int valid = cols - c0;
  const bool layer = p.norm == Norm::kLayer;
  float acc_dgamma[VEC], acc_dbeta[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc_dgamma[i] = acc_dbeta[i] = 0.0f;
  if (valid > 0) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kColumnTileY + threadIdx.y; row < p.rows;
         row += static_cast<int64_t>(gridDim.y) * kColumnTileY) {
      float x[VEC], dy[VEC];
      if constexpr (GATED) {  // x holds a
        load_gated_act<T, kRuntimeActivation>(p, row, c0, valid, vec_ok,
                                              gate_of(p.input_activation), x);
      } else {
        load_vec<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + c0, valid, vec_ok, x);
      }
      load_vec<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + c0, valid, vec_ok, dy);
      const float rstd = p.rstd[row];
      const float mean = layer ? p.mean[row] : 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat =
            GATED ? (x[i] - mean) * rstd
                  : normalized<T, kRuntimeActivation>(x[i], mean, rstd, p.input_activation);
        acc_dgamma[i] = fmaf(dy[i], xhat, acc_dgamma[i]);
        acc_dbeta[i] += dy[i];
      }
    }
  }
  if (dgamma_part != nullptr)
    write_tile_partial<kColumnTileX, kColumnTileY, VEC>(acc_dgamma, dgamma_part, cols, c0, tile);
  if (dbeta_part != nullptr)
    write_tile_partial<kColumnTileX, kColumnTileY, VEC>(acc_dbeta, dbeta_part, cols, c0, tile);
}

// How a backward runs for given sizes: the register kernel (nv > 0) or the wide kernels, with
// the grid and the number of partial rows its stage one writes.
struct Plan {
  int nv = 0;          // vectors per thread of norm_backward_rows; 0: wide kernels
  int tpr = 0;         // threads per row
  int block = 0;
  size_t smem = 0;     // dynamic shared memory of norm_backward_rows
  unsigned grid_x = 0;
  unsigned grid_y = 1;      // norm_backward_columns only
  int64_t partials = 0;     // partial rows per reduced parameter
};

template <typename T, Activation ACT, int NV>
Plan plan_rows(int64_t rows, int tpr) {
  constexpr int VEC = kVec<T>;
  Plan plan;
  plan.nv = NV;
  plan.tpr = tpr;
  plan.block = std::max(tpr, kRowsBlockMin);
  const int rows_per_block = plan.block / tpr;
  plan.smem = rows_per_block > 1 ? sizeof(float) * plan.block * NV * VEC : 0;
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, norm_backward_rows<T, ACT, NV>,
                                                    plan.block, plan.smem) != cudaSuccess) {
    cudaGetLastError();  // clear it; fall back to one block per SM
    per_sm = 1;
  }
  const int64_t max_blocks = static_cast<int64_t>(std::max(per_sm, 1)) * std::max(num_sms(), 1);
  plan.grid_x = static_cast<unsigned>(std::min(ceil_div(rows, rows_per_block), max_blocks));
  plan.partials = plan.grid_x;
  return plan;
}

template <typename T, Activation ACT>
Plan make_plan(int64_t rows, int64_t cols) {
  constexpr int VEC = kVec<T>;
  constexpr int kMaxNV = kRegisterFloats / VEC;  // 4 for float32, 2 for 16-bit types
  const int64_t nvec = ceil_div(cols, VEC);
  const int tpr = static_cast<int>(std::min<int64_t>(
      kMaxThreadsPerRow, std::max<int64_t>(kWarp, next_pow2(ceil_div(nvec, kMaxNV)))));
  if (nvec <= tpr) return plan_rows<T, ACT, 1>(rows, tpr);
  if (nvec <= 2 * tpr) return plan_rows<T, ACT, 2>(rows, tpr);
  if constexpr (kMaxNV >= 4) {
    if (nvec <= 4 * tpr) return plan_rows<T, ACT, 4>(rows, tpr);
  }
  Plan plan;
  plan.block = kColumnTileX * kColumnTileY;
  plan.grid_x = static_cast<unsigned>(ceil_div(nvec, kColumnTileX));
  const int64_t chunks = ceil_div(static_cast<int64_t>(std::max(num_sms(), 1)) * 8, plan.grid_x);
  plan.grid_y = static_cast<unsigned>(
      std::min<int64_t>(std::min<int64_t>(chunks, ceil_div(rows, kColumnTileY)), 65535));
  plan.partials = plan.grid_y;
  return plan;
}

Plan plan_for(int64_t rows, int64_t cols, DType dtype, Activation act) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_input_activation(
        act, [&](auto a) { return make_plan<T, decltype(a)::value>(rows, cols); });
  });
}

template <typename T, Activation ACT>
void launch(const NormBackwardParams& p, const Plan& plan, bool vec_ok, float* dgamma_part,
            float* dbeta_part, cudaStream_t stream) {
  if (p.rows == 0) return;
  if (plan.nv == 0) {
    if (p.dx != nullptr || p.row_sums != nullptr)
      launch_kernel(norm_backward_wide_dx<T, is_gated(ACT)>, static_cast<unsigned>(p.rows),
                    kWideThreads, 0, stream)(p, vec_ok);
    if (dgamma_part != nullptr || dbeta_part != nullptr)
      launch_kernel(norm_backward_columns<T, is_gated(ACT)>, dim3(plan.grid_x, plan.grid_y),
                    dim3(kColumnTileX, kColumnTileY), 0, stream)(p, vec_ok, dgamma_part,
                                                                 dbeta_part);
    return;
  }
  switch (plan.nv) {
    case 1:
      launch_kernel(norm_backward_rows<T, ACT, 1>, plan.grid_x, plan.block, plan.smem, stream)(
          p, plan.tpr, vec_ok, dgamma_part, dbeta_part);
      break;
    case 2:
      launch_kernel(norm_backward_rows<T, ACT, 2>, plan.grid_x, plan.block, plan.smem, stream)(
          p, plan.tpr, vec_ok, dgamma_part, dbeta_part);
      break;
    default:
      if constexpr (kVec<T> == 4) {
        launch_kernel(norm_backward_rows<T, ACT, 4>, plan.grid_x, plan.block, plan.smem, stream)(
            p, plan.tpr, vec_ok, dgamma_part, dbeta_part);
      }
      break;
  }
}

Status validate(const NormBackwardParams& p) {
  if (p.rows < 0 || p.cols < 0) return "magneto cuda norm_backward: negative size";
  if (p.cols > (int64_t{1} << 30)) return "magneto cuda norm_backward: cols too large";
  if (p.rows > int64_t{0x7fffffff}) return "magneto cuda norm_backward: more than 2^31-1 rows";
  if (!valid_dtype(p.dtype)) return "magneto cuda norm_backward: unknown dtype code";
  if (p.param_dtype != p.dtype && p.param_dtype != DType::kFloat32)
    return "magneto cuda norm_backward: param_dtype must be dtype or float32";
  if (!valid_input_activation(p.input_activation))
    return "magneto cuda norm_backward: unknown activation code";
  if (!in_table(kNorms, p.norm))
    return "magneto cuda norm_backward: unknown norm code";
  if (p.rows > 0 && p.cols > 0 && (p.x == nullptr || p.dy == nullptr))
    return "magneto cuda norm_backward: x and dy are required";
  const bool gated = is_gated(p.input_activation);
  const int64_t x_cols = gated ? 2 * p.cols : p.cols;  // x and dx: [gate | up] when gated
  if (p.x_stride < x_cols || p.dy_stride < p.cols || (p.dx && p.dx_stride < x_cols) ||
      (p.grad_accum && p.grad_accum_stride < p.cols))
    return "magneto cuda norm_backward: a row stride is smaller than cols";
  if (gated && p.grad_accum != nullptr)
    return "magneto cuda norm_backward: a gated input activation takes no grad_accum";
  if (p.norm == Norm::kNone && (p.gamma || p.dgamma || p.dbeta))
    return "magneto cuda norm_backward: norm kNone has no gamma, dgamma or dbeta";
  if (p.norm == Norm::kRms && p.dbeta) return "magneto cuda norm_backward: kRms has no dbeta";
  if (p.rows > 0 && ((p.norm != Norm::kNone && !p.rstd) || (p.norm == Norm::kLayer && !p.mean)))
    return "magneto cuda norm_backward: missing mean (kLayer) or rstd";
  return nullptr;
}

}  // namespace
}  // namespace detail

size_t norm_backward_workspace_bytes(int64_t rows, int64_t cols, DType dtype,
                                     Activation input_activation, bool want_dgamma,
                                     bool want_dbeta) {
  using namespace detail;
  const int arrays = static_cast<int>(want_dgamma) + static_cast<int>(want_dbeta);
  if (arrays == 0 || rows <= 0 || cols <= 0 || !valid_dtype(dtype) ||
      !valid_input_activation(input_activation))
    return 0;
  const Plan plan = plan_for(rows, cols, dtype, input_activation);
  return sizeof(float) * static_cast<size_t>(arrays) * static_cast<size_t>(plan.partials) *
         static_cast<size_t>(cols);
}

Status norm_backward(const NormBackwardParams& p, cudaStream_t stream) {
  using namespace detail;
  if (Status err = validate(p)) return err;
  if (p.cols == 0) return nullptr;
  const Plan plan = plan_for(p.rows, p.cols, p.dtype, p.input_activation);
  const size_t part_floats = static_cast<size_t>(plan.partials) * static_cast<size_t>(p.cols);
  const int arrays = static_cast<int>(p.dgamma != nullptr) + static_cast<int>(p.dbeta != nullptr);
  if (p.rows > 0 && arrays > 0 &&
      (p.workspace == nullptr || p.workspace_bytes < sizeof(float) * arrays * part_floats))
    return "magneto cuda norm_backward: workspace smaller than norm_backward_workspace_bytes";
  float* dgamma_part = p.dgamma != nullptr ? static_cast<float*>(p.workspace) : nullptr;
  float* dbeta_part = p.dbeta != nullptr
                          ? static_cast<float*>(p.workspace) + (dgamma_part ? part_floats : 0)
                          : nullptr;

  const int eb = elem_bytes(p.dtype);
  const bool vec_ok = aligned16(p.x) && stride_ok(p.x_stride, eb) && aligned16(p.dy) &&
                      stride_ok(p.dy_stride, eb) && aligned16(p.dx) && stride_ok(p.dx_stride, eb) &&
                      aligned16(p.grad_accum) && stride_ok(p.grad_accum_stride, eb) &&
                      aligned16(p.gamma) &&
                      (!is_gated(p.input_activation) || stride_ok(p.cols, eb));  // the up halves
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_input_activation(p.input_activation, [&](auto act) {
      launch<T, decltype(act)::value>(p, plan, vec_ok, dgamma_part, dbeta_part, stream);
      return 0;
    });
  });
  if (Status err = launch_status()) return err;
  if (p.dgamma != nullptr) {
    if (Status err =
            column_sum(dgamma_part, plan.partials, p.cols, p.dgamma, p.param_dtype, stream))
      return err;
  }
  if (p.dbeta != nullptr) {
    if (Status err = column_sum(dbeta_part, plan.partials, p.cols, p.dbeta, p.param_dtype, stream))
      return err;
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace magneto
