// Stage two of the deterministic column reductions (dgamma, dbeta, dbias): a fixed-order sum
// over the per-block partial rows that stage one wrote to the workspace. No atomics, so repeated
// runs on the same device give bitwise-identical gradients.
#include "cuda/common.cuh"

namespace magneto {
namespace cuda {
namespace detail {
namespace {

constexpr int kColumnSumThreads = 256;

// One thread per column; consecutive threads read consecutive addresses of each partial row.
template <typename O>
__global__ void __launch_bounds__(kColumnSumThreads)
    column_sum_kernel(const float* partials, int64_t num_partials, int64_t cols, O* out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float s = 0.0f;
  for (int64_t p = 0; p < num_partials; ++p) s += partials[p * cols + col];
  out[col] = from_float<O>(s);
}

}  // namespace

Status column_sum(const float* partials, int64_t num_partials, int64_t cols, void* out,
                  DType out_dtype, cudaStream_t stream) {
  if (cols <= 0) return nullptr;
  if (out == nullptr || (num_partials > 0 && partials == nullptr))
    return "magneto cuda column_sum: null pointer";
  const unsigned blocks = static_cast<unsigned>(ceil_div(cols, kColumnSumThreads));
  dispatch_dtype(out_dtype, [&](auto tag) {
    using O = typename decltype(tag)::type;
    launch_kernel(column_sum_kernel<O>, blocks, kColumnSumThreads, 0, stream)(
        partials, num_partials, cols, static_cast<O*>(out));
    return 0;
  });
  return launch_status();
}

}  // namespace detail
}  // namespace cuda
}  // namespace magneto
