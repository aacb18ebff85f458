// The memory-bound passes around ln_linear's cuBLAS GEMMs.
// - linear_epilogue: bias, output activation, Philox dropout and the alpha-scaled residual in
//   one read of the GEMM output (plus the pre-activation, saved for backward).
// - linear_epilogue_backward: dz = dy * dropout mask * act'(preact) in one pass, with the dbias
//   column sums of dz reduced deterministically (tile partials, then column_sum).
// Both use column tiles: a block of kTileX x kTileY threads, thread (x, y) owning one 16-byte
// vector of columns and rows y, y + kTileY, ... of its row chunk, so that a warp reads 32
// consecutive vectors of a row.
#include "cuda/common.cuh"

namespace magneto {
namespace cuda {
namespace detail {
namespace {

constexpr int kTileX = 32;
constexpr int kTileY = 8;
constexpr unsigned kMaxGridY = 65535;

// v scaled by the dropout keep-scale, or zero when element `index` is dropped.
__device__ __forceinline__ float dropout(float v, uint64_t seed, uint64_t index, uint32_t threshold,
                                         float scale) {
  return philox(seed, index) >= threshold ? v * scale : 0.0f;
}

template <typename T, typename P, Activation ACT>
__global__ void __launch_bounds__(kTileX* kTileY)
    linear_epilogue_kernel(const LinearEpilogueParams p, bool vec_ok) {
  constexpr int VEC = kVec<T>;
  const int64_t cols = p.cols;
  const int c0 = (static_cast<int>(blockIdx.x) * kTileX + static_cast<int>(threadIdx.x)) * VEC;
  const int valid = static_cast<int>(cols - c0);
  if (valid <= 0) return;  // no block-level synchronisation below
  float bias[VEC];
  if (p.bias != nullptr) {
    load_vec<T, VEC>(static_cast<const T*>(p.bias) + c0, valid, vec_ok, bias);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) bias[i] = 0.0f;
  }
  const bool drop = p.seed != nullptr;
  const uint64_t seed = drop ? static_cast<uint64_t>(*p.seed) : 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kTileY + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.y) * kTileY) {
    float v[VEC];
    load_vec<P, VEC>(static_cast<const P*>(p.product) + row * p.product_stride + c0, valid, vec_ok,
                     v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = round_to<T>(v[i] + bias[i]);  // the pre-activation
    if (p.preact != nullptr)
      store_vec<T, VEC>(static_cast<T*>(p.preact) + row * p.preact_stride + c0, valid, vec_ok, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = act_forward<ACT>(v[i]);
    if (drop) {
      const uint64_t first = static_cast<uint64_t>(row * cols + c0);
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        v[i] = dropout(v[i], seed, first + i, p.dropout_threshold, p.dropout_scale);
    }
    if (p.residual != nullptr) {
      float r[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.residual) + row * p.residual_stride + c0, valid,
                       vec_ok, r);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = fmaf(p.alpha, r[i], v[i]);
    }
    store_vec<T, VEC>(static_cast<T*>(p.out) + row * p.out_stride + c0, valid, vec_ok, v);
  }
}

template <typename T, Activation ACT>
__global__ void __launch_bounds__(kTileX* kTileY)
    linear_epilogue_backward_kernel(const LinearEpilogueBackwardParams p, bool vec_ok,
                                    float* db_part) {
  constexpr int VEC = kVec<T>;
  __shared__ float tile[kTileY][kTileX * VEC];
  const int64_t cols = p.cols;
  const int c0 = (static_cast<int>(blockIdx.x) * kTileX + static_cast<int>(threadIdx.x)) * VEC;
  const int valid = static_cast<int>(cols - c0);  // threads without columns still join the sync
  const bool drop = p.seed != nullptr;
  const uint64_t seed = drop ? static_cast<uint64_t>(*p.seed) : 0;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
  if (valid > 0) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kTileY + threadIdx.y; row < p.rows;
         row += static_cast<int64_t>(gridDim.y) * kTileY) {
      float d[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + c0, valid, vec_ok, d);
      if constexpr (ACT != Activation::kNone) {
        float preact[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.preact) + row * p.preact_stride + c0, valid,
                         vec_ok, preact);
#pragma unroll
        for (int i = 0; i < VEC; ++i) d[i] *= act_derivative<ACT>(preact[i]);
      }
      if (drop) {
        const uint64_t first = static_cast<uint64_t>(row * cols + c0);
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          d[i] = dropout(d[i], seed, first + i, p.dropout_threshold, p.dropout_scale);
      }
      store_vec<T, VEC>(static_cast<T*>(p.dz) + row * p.dz_stride + c0, valid, vec_ok, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += d[i];  // missing elements are zero
    }
  }
  if (db_part != nullptr)
    write_tile_partial<kTileX, kTileY, VEC>(acc, db_part, static_cast<int>(cols), c0, tile);
}

// Grid of the column-tile kernels: x covers the columns; y = row chunks. With a column
// reduction, y (= the number of partial rows) targets ~8 blocks per SM in all.
dim3 tile_grid(int64_t rows, int64_t cols, int vec, bool reduce) {
  const int64_t gx = ceil_div(ceil_div(cols, vec), kTileX);
  int64_t gy = std::min<int64_t>(ceil_div(rows, kTileY), kMaxGridY);
  if (reduce) {
    const int64_t target_blocks = static_cast<int64_t>(std::max(num_sms(), 1)) * 8;
    gy = std::min<int64_t>(gy, ceil_div(target_blocks, gx));
  }
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

bool valid_common(int64_t rows, int64_t cols, DType dtype, Activation act) {
  return rows >= 0 && cols >= 0 && cols <= (int64_t{1} << 30) && valid_dtype(dtype) &&
         valid_activation(act);
}

}  // namespace
}  // namespace detail

Status linear_epilogue(const LinearEpilogueParams& p, cudaStream_t stream) {
  using namespace detail;
  if (!valid_common(p.rows, p.cols, p.dtype, p.activation))
    return "magneto cuda linear_epilogue: invalid size, dtype or activation code";
  if (p.product_dtype != p.dtype && p.product_dtype != DType::kFloat32)
    return "magneto cuda linear_epilogue: product_dtype must be dtype or float32";
  if (p.rows == 0 || p.cols == 0) return nullptr;
  if (p.product == nullptr || p.out == nullptr)
    return "magneto cuda linear_epilogue: product and out are required";
  if (p.product_stride < p.cols || p.out_stride < p.cols ||
      (p.residual && p.residual_stride < p.cols) || (p.preact && p.preact_stride < p.cols))
    return "magneto cuda linear_epilogue: a row stride is smaller than cols";
  const int eb = elem_bytes(p.dtype);
  const bool vec_ok = aligned16(p.product) &&
                      stride_ok(p.product_stride, elem_bytes(p.product_dtype)) &&
                      aligned16(p.bias) && aligned16(p.residual) &&
                      stride_ok(p.residual_stride, eb) && aligned16(p.out) &&
                      stride_ok(p.out_stride, eb) && aligned16(p.preact) &&
                      stride_ok(p.preact_stride, eb);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid = tile_grid(p.rows, p.cols, kVec<T>, false);
    const dim3 block(kTileX, kTileY);
    return dispatch_activation(p.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      if constexpr (std::is_same_v<T, float>) {
        launch_kernel(linear_epilogue_kernel<T, float, A>, grid, block, 0, stream)(p, vec_ok);
      } else {
        if (p.product_dtype == DType::kFloat32)
          launch_kernel(linear_epilogue_kernel<T, float, A>, grid, block, 0, stream)(p, vec_ok);
        else
          launch_kernel(linear_epilogue_kernel<T, T, A>, grid, block, 0, stream)(p, vec_ok);
      }
      return 0;
    });
  });
  return launch_status();
}

size_t linear_epilogue_backward_workspace_bytes(int64_t rows, int64_t cols, DType dtype,
                                                bool want_dbias) {
  using namespace detail;
  if (!want_dbias || rows <= 0 || cols <= 0 || !valid_dtype(dtype)) return 0;
  const dim3 grid = tile_grid(rows, cols, 16 / elem_bytes(dtype), true);
  return sizeof(float) * static_cast<size_t>(grid.y) * static_cast<size_t>(cols);
}

Status linear_epilogue_backward(const LinearEpilogueBackwardParams& p, cudaStream_t stream) {
  using namespace detail;
  if (!valid_common(p.rows, p.cols, p.dtype, p.activation))
    return "magneto cuda linear_epilogue_backward: invalid size, dtype or activation code";
  if (p.cols == 0) return nullptr;
  const bool reduce = p.dbias != nullptr;
  const dim3 grid = tile_grid(p.rows, p.cols, 16 / elem_bytes(p.dtype), reduce);
  if (p.rows > 0) {
    if (p.dy == nullptr || p.dz == nullptr)
      return "magneto cuda linear_epilogue_backward: dy and dz are required";
    if (p.activation != Activation::kNone && p.preact == nullptr)
      return "magneto cuda linear_epilogue_backward: preact is required with an activation";
    if (p.dy_stride < p.cols || p.dz_stride < p.cols || (p.preact && p.preact_stride < p.cols))
      return "magneto cuda linear_epilogue_backward: a row stride is smaller than cols";
    if (reduce && (p.workspace == nullptr ||
                   p.workspace_bytes < sizeof(float) * static_cast<size_t>(grid.y) *
                                           static_cast<size_t>(p.cols)))
      return "magneto cuda linear_epilogue_backward: workspace smaller than "
             "linear_epilogue_backward_workspace_bytes";
    const int eb = elem_bytes(p.dtype);
    const bool vec_ok = aligned16(p.dy) && stride_ok(p.dy_stride, eb) && aligned16(p.dz) &&
                        stride_ok(p.dz_stride, eb) && aligned16(p.preact) &&
                        stride_ok(p.preact_stride, eb);
    float* db_part = reduce ? static_cast<float*>(p.workspace) : nullptr;
    dispatch_dtype(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return dispatch_activation(p.activation, [&](auto act) {
        launch_kernel(linear_epilogue_backward_kernel<T, decltype(act)::value>, grid,
                      dim3(kTileX, kTileY), 0, stream)(p, vec_ok, db_part);
        return 0;
      });
    });
    if (Status err = launch_status()) return err;
  }
  if (reduce) {
    const int64_t partials = p.rows > 0 ? grid.y : 0;
    return column_sum(static_cast<const float*>(p.workspace), partials, p.cols, p.dbias, p.dtype,
                      stream);
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace magneto
