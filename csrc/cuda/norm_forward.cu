// Norm forward: LayerNorm / RMSNorm / none over rows, with the optional alpha-scaled residual
// add (add_layer_norm), input activation (ln_linear's prologue; a gated one reads rows of 2*cols,
// [gate | up]) and saved statistics (ln_linear's backward recomputing its GEMM operand).
//
// Two kernels:
// - norm_forward_rows: the row lives in registers. A row group of `tpr` threads (32..512, a
//   power of two) owns one row; each thread holds NV vectors of 16 bytes, vector j of lane l
//   covering columns [(j*tpr + l)*VEC, +VEC). tpr == 32 is a warp per row (several rows per
//   block, no shared memory), larger tpr a block per row. Statistics are the exact two-pass
//   ones (mean, then the mean squared deviation) from registers.
// - norm_forward_wide: a 512-thread block per row for rows too wide for registers: Welford
//   statistics in a first read, normalisation in a second read (served mostly by L2); its
//   input activation is a runtime switch (whether it is gated, a template flag).
#include "cuda/common.cuh"

namespace magneto {
namespace cuda {
namespace detail {
namespace {

constexpr int kRowsBlockMin = 128;   // threads per block of the register kernel, at least
constexpr int kWideThreads = 512;    // threads per block of the wide kernel
constexpr int kMaxNV = 8;            // 16-byte vectors per thread in the register kernel

// Loads VEC elements of s = x (+ alpha*residual) at column c0 of row `row`, writes s (rounded)
// to p.sum when asked, and returns a = round(in_act(s)) in `a`. GATED (no residual then): a =
// round(act(gate)*up), the gate at column c0 of x's row and up cols columns further.
// A: the (gate's) activation, or kRuntimeActivation for the code `runtime`.
template <typename T, Activation A, bool GATED>
__device__ __forceinline__ void load_input(const NormForwardParams& p, int64_t row, int c0,
                                           int valid, bool vec_ok, bool write_sum,
                                           Activation runtime, float (&a)[kVec<T>]) {
  constexpr int VEC = kVec<T>;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride + c0;
  load_vec<T, VEC>(x, valid, vec_ok, a);
  if constexpr (GATED) {
    float up[VEC];
    load_vec<T, VEC>(x + p.cols, valid, vec_ok, up);  // missing elements: act(0)*0 = 0
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = gated_act<T, A>(a[i], up[i], runtime);
  } else {
    if (p.residual != nullptr) {
      float r[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.residual) + row * p.residual_stride + c0, valid,
                       vec_ok, r);
#pragma unroll
      // s rounded to T: the statistics are those of s as stored, which the backward reads.
      for (int i = 0; i < VEC; ++i) a[i] = round_to<T>(fmaf(p.alpha, r[i], a[i]));
      if (write_sum && p.sum != nullptr)
        store_vec<T, VEC>(static_cast<T*>(p.sum) + row * p.sum_stride + c0, valid, vec_ok, a);
    }
    if (has_activation<A>(runtime)) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] = round_to<T>(activation<A>(a[i], runtime));
    }
  }
}

// Writes y = (a - mean)*rstd*w + b (kLayer; mean = 0, b = 0 for kRms) or y = a (kNone).
template <typename T>
__device__ __forceinline__ void store_output(const NormForwardParams& p, int64_t row, int c0,
                                             int valid, bool vec_ok, float mean, float rstd,
                                             const float (&a)[kVec<T>]) {
  constexpr int VEC = kVec<T>;
  float y[VEC];
  if (p.norm == Norm::kNone) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = a[i];
  } else {
    const bool param_f32 = p.param_dtype == DType::kFloat32;
    float w[VEC], b[VEC];
    load_param<T, VEC>(p.gamma, param_f32, c0, valid, vec_ok, 1.0f, w);
    load_param<T, VEC>(p.beta, param_f32, c0, valid, vec_ok, 0.0f, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = fmaf((a[i] - mean) * rstd, w[i], b[i]);
  }
  store_vec<T, VEC>(static_cast<T*>(p.y) + row * p.y_stride + c0, valid, vec_ok, y);
}

template <typename T, Activation ACT, int NV>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    norm_forward_rows(const NormForwardParams p, int tpr, bool vec_ok) {
  constexpr int VEC = kVec<T>;
  __shared__ float2 red[2][kMaxThreadsPerRow / kWarp];
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + static_cast<int>(threadIdx.x) / tpr;
  const bool active = row < p.rows;  // inactive groups still join the block's reductions
  const int cols = static_cast<int>(p.cols);

  float a[NV][VEC];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int c0 = (j * tpr + lane) * VEC;
    load_input<T, gate_of(ACT), is_gated(ACT)>(p, row, c0, active ? cols - c0 : 0, vec_ok, true,
                                               p.input_activation, a[j]);
  }

  float mean = 0.0f, rstd = 1.0f;
  if (p.norm != Norm::kNone) {
    const bool layer = p.norm == Norm::kLayer;
    if (p.saved_rstd != nullptr) {
      if (active) {
        rstd = p.saved_rstd[row];
        mean = layer ? p.saved_mean[row] : 0.0f;
      }
    } else {
      if (layer) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < NV; ++j)
#pragma unroll
          for (int i = 0; i < VEC; ++i) s += a[j][i];  // missing elements are zero
        mean = group_sum2(s, 0.0f, tpr, red[0]).x / static_cast<float>(cols);
      }
      float q = 0.0f;
#pragma unroll
      for (int j = 0; j < NV; ++j)
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = a[j][i] - mean;
          if ((j * tpr + lane) * VEC + i < cols) q += d * d;
        }
      const float m2 = group_sum2(q, 0.0f, tpr, red[1]).x;
      rstd = rsqrtf(m2 / static_cast<float>(cols) + p.eps);
      if (active && lane == 0) {
        if (layer && p.mean != nullptr) p.mean[row] = mean;
        if (p.rstd != nullptr) p.rstd[row] = rstd;
        if (p.m2 != nullptr) p.m2[row] = m2;
      }
    }
  }

  if (active && p.y != nullptr) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c0 = (j * tpr + lane) * VEC;
      if (c0 < cols) store_output<T>(p, row, c0, cols - c0, vec_ok, mean, rstd, a[j]);
    }
  }
}

// Welford state of a set of values: count, mean, sum of squared deviations.
struct Welford {
  float n, mean, m2;
};

// Chan et al.'s merge of two Welford states.
__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

template <typename T, bool GATED>
__global__ void __launch_bounds__(kWideThreads)
    norm_forward_wide(const NormForwardParams p, bool vec_ok) {
  constexpr int VEC = kVec<T>;
  const Activation act = GATED ? gate_of(p.input_activation) : p.input_activation;
  __shared__ Welford warp_states[kWideThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int cols = static_cast<int>(p.cols);
  const int nvec = static_cast<int>(ceil_div(cols, VEC));
  const bool layer = p.norm == Norm::kLayer;

  float mean = 0.0f, rstd = 1.0f;
  if (p.norm != Norm::kNone && p.saved_rstd != nullptr) {
    rstd = p.saved_rstd[row];
    mean = layer ? p.saved_mean[row] : 0.0f;
  } else if (p.norm != Norm::kNone || p.sum != nullptr) {
    // Pass 1: each thread folds its vectors into one Welford state (exact two-pass statistics
    // within a vector, Chan's merge across vectors); RMSNorm only needs the sum of squares, kept
    // in m2 with mean 0. Also writes s for add_layer_norm.
    Welford st{0.0f, 0.0f, 0.0f};
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int c0 = v * VEC;
      const int valid = cols - c0;
      float a[VEC];
      load_input<T, kRuntimeActivation, GATED>(p, row, c0, valid, vec_ok, true, act, a);
      const int n = valid < VEC ? valid : VEC;
      float vs = 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) vs += a[i];  // missing elements are zero
      const float vmean = layer ? vs / static_cast<float>(n) : 0.0f;
      float vm2 = 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (i < n) vm2 += (a[i] - vmean) * (a[i] - vmean);
      st = layer ? merge(st, Welford{static_cast<float>(n), vmean, vm2})
                 : Welford{st.n + n, 0.0f, st.m2 + vm2};
    }
    if (p.norm != Norm::kNone) {
      // Tree within each warp down to lane 0, then every thread merges the warps in order.
#pragma unroll
      for (int o = kWarp / 2; o > 0; o >>= 1) {
        const Welford other{__shfl_down_sync(kFullMask, st.n, o),
                            __shfl_down_sync(kFullMask, st.mean, o),
                            __shfl_down_sync(kFullMask, st.m2, o)};
        st = merge(st, other);
      }
      if (threadIdx.x % kWarp == 0) warp_states[threadIdx.x / kWarp] = st;
      __syncthreads();
      Welford total = warp_states[0];
      for (int w = 1; w < static_cast<int>(blockDim.x) / kWarp; ++w)
        total = merge(total, warp_states[w]);
      mean = layer ? total.mean : 0.0f;
      rstd = rsqrtf(total.m2 / static_cast<float>(cols) + p.eps);
      if (threadIdx.x == 0) {
        if (layer && p.mean != nullptr) p.mean[row] = mean;
        if (p.rstd != nullptr) p.rstd[row] = rstd;
        if (p.m2 != nullptr) p.m2[row] = total.m2;
      }
    }
  }
  if (p.y == nullptr) return;
  // Pass 2: recompute a (bitwise as in pass 1) and normalise.
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int c0 = v * VEC;
    float a[VEC];
    load_input<T, kRuntimeActivation, GATED>(p, row, c0, cols - c0, vec_ok, false, act, a);
    store_output<T>(p, row, c0, cols - c0, vec_ok, mean, rstd, a);
  }
}

// Threads per row (about a quarter of the row's vectors, 32..512) and vectors per thread
// (1, 4 or 8: few instantiations) of the register kernel; nv == 0: too wide for registers.
struct RowPlan {
  int nv;
  int tpr;
};

RowPlan plan_rows(int64_t nvec) {
  const int tpr = static_cast<int>(std::min<int64_t>(
      kMaxThreadsPerRow, std::max<int64_t>(kWarp, next_pow2(ceil_div(nvec, 4)))));
  for (int nv : {1, 4, kMaxNV})
    if (static_cast<int64_t>(tpr) * nv >= nvec) return {nv, tpr};
  return {0, tpr};
}

template <typename T, Activation ACT>
void launch(const NormForwardParams& p, bool vec_ok, cudaStream_t stream) {
  constexpr int VEC = kVec<T>;
  const RowPlan plan = plan_rows(ceil_div(p.cols, VEC));
  if (plan.nv == 0) {
    launch_kernel(norm_forward_wide<T, is_gated(ACT)>, static_cast<unsigned>(p.rows), kWideThreads,
                  0, stream)(p, vec_ok);
    return;
  }
  const int block = std::max(plan.tpr, kRowsBlockMin);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.rows, block / plan.tpr));
  switch (plan.nv) {
    case 1:
      launch_kernel(norm_forward_rows<T, ACT, 1>, grid, block, 0, stream)(p, plan.tpr, vec_ok);
      break;
    case 4:
      launch_kernel(norm_forward_rows<T, ACT, 4>, grid, block, 0, stream)(p, plan.tpr, vec_ok);
      break;
    default:
      launch_kernel(norm_forward_rows<T, ACT, 8>, grid, block, 0, stream)(p, plan.tpr, vec_ok);
      break;
  }
}

Status validate(const NormForwardParams& p) {
  if (p.rows < 0 || p.cols < 0) return "magneto cuda norm_forward: negative size";
  if (p.cols > (int64_t{1} << 30)) return "magneto cuda norm_forward: cols too large";
  if (p.rows > int64_t{0x7fffffff}) return "magneto cuda norm_forward: more than 2^31-1 rows";
  if (!valid_dtype(p.dtype)) return "magneto cuda norm_forward: unknown dtype code";
  if (p.param_dtype != p.dtype && p.param_dtype != DType::kFloat32)
    return "magneto cuda norm_forward: param_dtype must be dtype or float32";
  if (!valid_input_activation(p.input_activation))
    return "magneto cuda norm_forward: unknown activation code";
  if (!in_table(kNorms, p.norm))
    return "magneto cuda norm_forward: unknown norm code";
  // An empty tensor has a null data pointer (zero-row batches): only non-empty x and y are
  // required.
  if (p.rows > 0 && p.cols > 0 && (p.x == nullptr || (p.y == nullptr && p.m2 == nullptr)))
    return "magneto cuda norm_forward: x and y (or m2) are required";
  if (p.m2 != nullptr && (p.norm == Norm::kNone || p.saved_rstd != nullptr))
    return "magneto cuda norm_forward: m2 needs a norm and no saved statistics";
  const bool gated = is_gated(p.input_activation);
  if (p.x_stride < (gated ? 2 * p.cols : p.cols) || (p.residual && p.residual_stride < p.cols) ||
      (p.y && p.y_stride < p.cols) || (p.sum && p.sum_stride < p.cols))
    return "magneto cuda norm_forward: a row stride is smaller than cols";
  if (p.norm == Norm::kNone && (p.gamma || p.beta || p.mean || p.rstd || p.saved_rstd))
    return "magneto cuda norm_forward: norm kNone takes no gamma, beta or statistics";
  if (p.norm == Norm::kRms && (p.beta || p.mean || p.saved_mean))
    return "magneto cuda norm_forward: norm kRms takes no beta and has no mean";
  if (p.saved_rstd != nullptr && (p.residual || (p.norm == Norm::kLayer && !p.saved_mean)))
    return "magneto cuda norm_forward: saved statistics need saved_mean (kLayer) and no residual";
  if (p.sum != nullptr && p.residual == nullptr)
    return "magneto cuda norm_forward: sum output without residual";
  if (gated && p.residual != nullptr)
    return "magneto cuda norm_forward: a gated input activation takes no residual";
  return nullptr;
}

}  // namespace

}  // namespace detail

Status norm_forward(const NormForwardParams& p, cudaStream_t stream) {
  using namespace detail;
  if (Status err = validate(p)) return err;
  if (p.rows == 0 || p.cols == 0) return nullptr;
  const int eb = elem_bytes(p.dtype);
  const bool vec_ok = aligned16(p.x) && stride_ok(p.x_stride, eb) && aligned16(p.residual) &&
                      stride_ok(p.residual_stride, eb) && aligned16(p.y) &&
                      stride_ok(p.y_stride, eb) && aligned16(p.sum) &&
                      stride_ok(p.sum_stride, eb) && aligned16(p.gamma) && aligned16(p.beta) &&
                      (!is_gated(p.input_activation) || stride_ok(p.cols, eb));  // the up half
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_input_activation(p.input_activation, [&](auto act) {
      launch<T, decltype(act)::value>(p, vec_ok, stream);
      return 0;
    });
  });
  return launch_status();
}

}  // namespace cuda
}  // namespace magneto
