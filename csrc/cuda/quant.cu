// BitNet b1.58's quantised projection (kernels.h, "quantised projection"; the specification is
// magneto_kernels/quant.py).
// - quantize_rows_kernel: a block per row. The norm's input is read three times (sum of squares,
//   absmax of h, codes), from L2 after the first, once when rstd and the row's amax are given
//   (tensor parallelism): h itself is never written, only its int8 codes with their scale and
//   sum (offline) or its fake-quantised copy (online).
// - quant_gemv (decode, up to kQuantGemvRows rows): a warp per output feature streams its packed
//   row once, 16 bytes a lane, against every row's codes. quant_gemm (prefill): 64x64 output
//   tiles over 128-wide k blocks through shared memory, each thread a 4x4 micro tile.
//   Both unpack the 2-bit codes c = t + 1 in registers ((word >> 2i) & 0x03030303: four
//   consecutive k per 32-bit word, common.h's layout) and accumulate __dp4a(c, q) in int32:
//   s8 x s8, because c <= 2 is a non-negative int8 and the signed form is the one CUDA exposes
//   as an intrinsic (u8 x s8 needs inline PTX), exact either way. Σ q·t = Σ q·c − Σ q in the
//   epilogue, with the scales divided as the spec's steps (__fdiv_rn: --use_fast_math would
//   otherwise approximate the divisions transformers' codes and outputs are defined by).
// - weight_abs_partials + weight_fake: the online mode's per-tensor WeightQuant (weight_fake
//   alone when mean|W| is given).
#include "cuda/common.cuh"

namespace magneto {
namespace cuda {
namespace detail {
namespace {

constexpr float kQmax = 127.0f;
constexpr float kActEps = 1e-5f;     // transformers' clamp of the per-token absmax (ActQuant)
constexpr float kWeightEps = 1e-5f;  // and of the per-tensor absmean (WeightQuant)
constexpr int kRowThreads = 256;
constexpr int kGemvThreads = 256;  // 8 warps: 8 output features per block
constexpr int kTile = 64;          // quant_gemm's output tile (rows and features)
constexpr int kTileThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kBlockWords = kQuantPackUnit / 4;  // 32-bit words of int8 codes per k block
constexpr int kQStride = kBlockWords + 4;        // q_s row: 16-byte aligned, rows 4 banks apart
constexpr int kCStride = kBlockWords + 1;        // c_s row: 16 features in 16 banks
constexpr int kWeightThreads = 256;
constexpr int64_t kMaxWeightPartials = 256;
constexpr uint32_t kCodeMask = 0x03030303u;

// max that returns NaN when either is NaN (fmaxf returns the other): a NaN in a row must make
// its amax, scale and outputs NaN, as transformers' formula does; an int8 code cannot carry it.
__device__ __forceinline__ float max_nan(float a, float b) { return a > b || a != a ? a : b; }
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return max_nan(a, b); }
};
struct AddOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a + b;
  }
};

// op over the block (every thread calls it); every thread gets the same total. buf: one V per
// warp, free again when it returns.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* buf) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  if (threadIdx.x % kWarp == 0) buf[threadIdx.x / kWarp] = v;
  __syncthreads();
  V total = buf[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / kWarp; ++w) total = op(total, buf[w]);
  __syncthreads();
  return total;
}

// 16 bytes at a 16-byte aligned address, as four 32-bit words (memcpy: see load_vec).
struct alignas(16) Words {
  uint32_t w[4];
};
__device__ __forceinline__ Words load_words(const void* p) {
  Words v;
  __builtin_memcpy(&v, __builtin_assume_aligned(p, 16), 16);
  return v;
}

__device__ __forceinline__ float quantize(float v, float s) {
  return fminf(fmaxf(rintf(v * s), -kQmax - 1.0f), kQmax);
}

// At least 1 block per SM: without the bound ptxas held the gated bf16 instance to 32 registers
// on sm_90a and spilled (tools/check_cuda.py refuses spills); it needs 40.
template <typename T, bool GATED>
__global__ void __launch_bounds__(kRowThreads, 1)
    quantize_rows_kernel(const QuantizeRowsParams p, bool vec_ok) {
  constexpr int VEC = kVec<T>;
  __shared__ float fbuf[kRowThreads / kWarp];
  __shared__ int ibuf[kRowThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int cols = static_cast<int>(p.cols);
  const int nvec = static_cast<int>(ceil_div(cols, VEC));
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const bool rms = p.norm == Norm::kRms;
  // a = round(in_act(x)) at columns c0.. (missing ones zero), as norm_forward computes it.
  auto load_a = [&](int c0, float(&a)[VEC]) {
    load_vec<T, VEC>(x + c0, cols - c0, vec_ok, a);
    if constexpr (GATED) {
      float up[VEC];
      load_vec<T, VEC>(x + p.cols + c0, cols - c0, vec_ok, up);
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        a[i] = gated_act<T, gate_of(Activation::kRelu2Glu)>(a[i], up[i], Activation::kNone);
    }
  };
  float rstd = 1.0f;
  if (rms && p.saved_rstd != nullptr) {
    rstd = p.saved_rstd[row];
  } else if (rms) {
    float ss = 0.0f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float a[VEC];
      load_a(v * VEC, a);
#pragma unroll
      for (int i = 0; i < VEC; ++i) ss += a[i] * a[i];
    }
    rstd = rsqrtf(block_reduce(ss, AddOp{}, fbuf) / static_cast<float>(cols) + p.eps);
    if (threadIdx.x == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
  }
  // h = round(a*rstd*gamma) (kRms) or a: norm_forward's y.
  auto load_h = [&](int c0, float(&h)[VEC]) {
    load_a(c0, h);
    if (rms) {
      float w[VEC];
      load_param<T, VEC>(p.gamma, p.param_dtype == DType::kFloat32, c0, cols - c0, vec_ok, 1.0f,
                         w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[i] = round_to<T>(h[i] * rstd * w[i]);
    }
  };
  float amax = 0.0f;
  if (p.amax != nullptr) {  // the same for every thread of the block
    amax = p.amax[row];
  } else {
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float h[VEC];
      load_h(v * VEC, h);
#pragma unroll
      for (int i = 0; i < VEC; ++i) amax = max_nan(amax, fabsf(h[i]));
    }
    amax = block_reduce(amax, MaxOp{}, fbuf);
  }
  const float s = __fdiv_rn(kQmax, max_nan(amax, kActEps));
  int sum = 0;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int c0 = v * VEC;
    float h[VEC];
    load_h(c0, h);
    if (p.fake != nullptr) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[i] = __fdiv_rn(quantize(h[i], s), s);
      store_vec<T, VEC>(static_cast<T*>(p.fake) + row * p.cols + c0, cols - c0, vec_ok, h);
    } else {
      int8_t* q = p.q + row * p.cols + c0;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (c0 + i < cols) {
          const int code = static_cast<int>(quantize(h[i], s));
          q[i] = static_cast<int8_t>(code);
          sum += code;
        }
      }
    }
  }
  if (p.fake == nullptr) {
    sum = block_reduce(sum, AddOp{}, ibuf);
    if (threadIdx.x == 0) {
      p.q_sum[row] = sum;
      p.scale[row] = s;
    }
  }
}

// out[row, col] from acc = Σ q·c (kernels.h, quant_linear).
template <typename T>
__device__ __forceinline__ void store_output(const QuantLinearParams& p, int64_t row, int64_t col,
                                             int acc, float ws) {
  const float dot = static_cast<float>(acc - p.q_sum[row]);  // Σ q·t, exact below 2^24
  const float s = p.scale[row];
  const float b = p.bias != nullptr ? to_float(static_cast<const T*>(p.bias)[col]) : 0.0f;
  float y;
  if (p.quant == Quant::kBitlinear) {
    y = round_to<T>(round_to<T>(__fdiv_rn(round_to<T>(dot), ws * round_to<T>(s))) + b);
  } else {
    y = round_to<T>((__fdiv_rn(dot, s) + b) * ws);
  }
  if (p.residual != nullptr) {
    y = fmaf(p.alpha, to_float(static_cast<const T*>(p.residual)[row * p.residual_stride + col]),
             y);
  }
  static_cast<T*>(p.out)[row * p.out_stride + col] = from_float<T>(y);
}

template <typename T, int R>
__global__ void __launch_bounds__(kGemvThreads) quant_gemv(const QuantLinearParams p) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * (kGemvThreads / kWarp) +
                      static_cast<int>(threadIdx.x) / kWarp;
  if (col >= p.out_features) return;  // the whole warp: its shuffles below stay complete
  const int rows = static_cast<int>(p.rows);
  const int64_t k = p.in_features;
  const uint8_t* w = p.weight + col * (k / 4);
  int acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0;
  // 16 bytes of packed codes per lane: half `v % 2` of k block v / 2.
  for (int64_t v = lane; v < k / 64; v += kWarp) {
    const Words packed = load_words(w + 16 * v);
    const int64_t k0 = (v / 2) * kQuantPackUnit + (v % 2) * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int codes[4];  // of k = k0 + 32i + 4m + (0..3)
#pragma unroll
      for (int m = 0; m < 4; ++m) codes[m] = static_cast<int>((packed.w[m] >> (2 * i)) & kCodeMask);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          const Words q = load_words(p.q + r * k + k0 + 32 * i);
#pragma unroll
          for (int m = 0; m < 4; ++m) acc[r] = __dp4a(codes[m], static_cast<int>(q.w[m]), acc[r]);
        }
      }
    }
  }
  const float ws = *p.weight_scale;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(kFullMask, acc[r], o);
    if (lane == r && r < rows) store_output<T>(p, r, col, acc[r], ws);
  }
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads) quant_gemm(const QuantLinearParams p) {
  __shared__ int q_s[kTile][kQStride];  // codes of a 64-row tile of q, 4 k per word
  __shared__ int c_s[kTile][kCStride];  // unpacked weight codes of 64 features, 4 k per word
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t k = p.in_features;
  int acc[4][4];
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int n = 0; n < 4; ++n) acc[m][n] = 0;
  for (int64_t k0 = 0; k0 < k; k0 += kQuantPackUnit) {
    // q: 64 rows x 8 vectors of 16 bytes; rows past the end read as zero codes.
    for (int e = tid; e < kTile * 8; e += kTileThreads) {
      const int r = e / 8, u = e % 8;
      const int64_t row = row0 + r;
      Words q{{0u, 0u, 0u, 0u}};
      if (row < p.rows) q = load_words(p.q + row * k + k0 + 16 * u);
#pragma unroll
      for (int m = 0; m < 4; ++m) q_s[r][4 * u + m] = static_cast<int>(q.w[m]);
    }
    // weight: 64 features x 2 vectors of 16 bytes (the k block's 32 bytes), each unpacked to
    // 16 words of codes; features past the end are zero codes, never stored.
    for (int e = tid; e < kTile * 2; e += kTileThreads) {
      const int n = e / 2, half = e % 2;
      const int64_t col = col0 + n;
      Words packed{{0u, 0u, 0u, 0u}};
      if (col < p.out_features) packed = load_words(p.weight + col * (k / 4) + k0 / 4 + 16 * half);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int m = 0; m < 4; ++m)
          c_s[n][8 * i + 4 * half + m] = static_cast<int>((packed.w[m] >> (2 * i)) & kCodeMask);
    }
    __syncthreads();
#pragma unroll 8
    for (int kw = 0; kw < kBlockWords; ++kw) {
      int a[4], c[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) a[m] = q_s[ty + 16 * m][kw];
#pragma unroll
      for (int n = 0; n < 4; ++n) c[n] = c_s[tx + 16 * n][kw];
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[m][n] = __dp4a(a[m], c[n], acc[m][n]);
    }
    __syncthreads();
  }
  const float ws = *p.weight_scale;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t row = row0 + ty + 16 * m;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int64_t col = col0 + tx + 16 * n;
      if (row < p.rows && col < p.out_features) store_output<T>(p, row, col, acc[m][n], ws);
    }
  }
}

int64_t weight_partials(int64_t numel) {
  return std::clamp<int64_t>(ceil_div(numel, 8192), 1, kMaxWeightPartials);
}

// partials[b] = Σ |W| over the elements b + parts·j (in kWeightThreads-wide strides).
template <typename T>
__global__ void __launch_bounds__(kWeightThreads)
    weight_abs_partials(const FakeQuantWeightParams p, int64_t parts) {
  __shared__ float buf[kWeightThreads / kWarp];
  const T* w = static_cast<const T*>(p.weight);
  float s = 0.0f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWeightThreads + threadIdx.x; i < p.numel;
       i += parts * kWeightThreads)
    s += fabsf(to_float(w[i]));
  s = block_reduce(s, AddOp{}, buf);
  if (threadIdx.x == 0) static_cast<float*>(p.workspace)[blockIdx.x] = s;
}

// Every block sums the partials in the same order (one s_w for all), or reads the given absmean,
// then fake-quantises its grid-stride share of W.
template <typename T>
__global__ void __launch_bounds__(kWeightThreads)
    weight_fake(const FakeQuantWeightParams p, int64_t parts) {
  __shared__ float buf[kWeightThreads / kWarp];
  float mean = 0.0f;
  if (p.absmean != nullptr) {
    mean = *p.absmean;
  } else {
    const float* partials = static_cast<const float*>(p.workspace);
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < parts; j += kWeightThreads) s += partials[j];
    mean = __fdiv_rn(block_reduce(s, AddOp{}, buf), static_cast<float>(p.numel));
  }
  const float sw = __fdiv_rn(1.0f, fmaxf(mean, kWeightEps));
  const T* w = static_cast<const T*>(p.weight);
  T* fake = static_cast<T*>(p.fake);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWeightThreads + threadIdx.x; i < p.numel;
       i += static_cast<int64_t>(gridDim.x) * kWeightThreads) {
    const float t = fminf(fmaxf(rintf(to_float(w[i]) * sw), -1.0f), 1.0f);
    fake[i] = from_float<T>(__fdiv_rn(t, sw));
  }
}

Status validate(const QuantizeRowsParams& p) {
  if (p.rows < 0 || p.cols < 0) return "magneto cuda quantize_rows: negative size";
  if (p.cols > (int64_t{1} << 30)) return "magneto cuda quantize_rows: cols too large";
  if (p.rows > int64_t{0x7fffffff}) return "magneto cuda quantize_rows: more than 2^31-1 rows";
  if (!valid_dtype(p.dtype)) return "magneto cuda quantize_rows: unknown dtype code";
  if (p.param_dtype != p.dtype && p.param_dtype != DType::kFloat32)
    return "magneto cuda quantize_rows: param_dtype must be dtype or float32";
  if (p.norm != Norm::kRms && p.norm != Norm::kNone)
    return "magneto cuda quantize_rows: norm must be kRms or kNone";
  if (p.norm == Norm::kNone && (p.gamma != nullptr || p.rstd != nullptr || p.saved_rstd))
    return "magneto cuda quantize_rows: norm kNone takes no gamma or statistics";
  if (p.input_activation != Activation::kNone && p.input_activation != Activation::kRelu2Glu)
    return "magneto cuda quantize_rows: input_activation must be kNone or kRelu2Glu";
  if (p.x_stride < (is_gated(p.input_activation) ? 2 * p.cols : p.cols))
    return "magneto cuda quantize_rows: x's row stride is smaller than its width";
  if (p.rows > 0 && p.cols > 0 &&
      (p.x == nullptr ||
       (p.fake == nullptr && (p.q == nullptr || p.q_sum == nullptr || p.scale == nullptr))))
    return "magneto cuda quantize_rows: x and fake, or x and q, q_sum and scale, are required";
  return nullptr;
}

Status validate(const QuantLinearParams& p) {
  if (p.rows < 0 || p.in_features < 0 || p.out_features < 0)
    return "magneto cuda quant_linear: negative size";
  if (p.in_features % kQuantPackUnit != 0)
    return "magneto cuda quant_linear: in_features must be a multiple of kQuantPackUnit";
  if (p.in_features > (int64_t{1} << 24) / 128)
    return "magneto cuda quant_linear: in_features too large for an exact float32 epilogue";
  if (p.rows > int64_t{0x7fffffff} / 2 || ceil_div(p.out_features, kTile) > 65535)
    return "magneto cuda quant_linear: too many rows or output features";
  if (!valid_dtype(p.dtype)) return "magneto cuda quant_linear: unknown dtype code";
  if (p.quant != Quant::kBitnetOffline && p.quant != Quant::kBitlinear)
    return "magneto cuda quant_linear: quant must be kBitnetOffline or kBitlinear";
  if (p.out_stride < p.out_features || (p.residual && p.residual_stride < p.out_features))
    return "magneto cuda quant_linear: a row stride is smaller than out_features";
  if (p.rows > 0 && p.out_features > 0 &&
      (p.q == nullptr || p.q_sum == nullptr || p.scale == nullptr || p.out == nullptr ||
       p.weight_scale == nullptr || (p.in_features > 0 && p.weight == nullptr)))
    return "magneto cuda quant_linear: q, q_sum, scale, weight, weight_scale and out are required";
  if (!aligned16(p.q) || !aligned16(p.weight))
    return "magneto cuda quant_linear: q and the packed weight must be 16-byte aligned";
  return nullptr;
}

}  // namespace
}  // namespace detail

Status quantize_rows(const QuantizeRowsParams& p, cudaStream_t stream) {
  using namespace detail;
  if (Status err = validate(p)) return err;
  if (p.rows == 0 || p.cols == 0) return nullptr;
  const int eb = elem_bytes(p.dtype);
  const bool vec_ok = aligned16(p.x) && stride_ok(p.x_stride, eb) && aligned16(p.gamma) &&
                      aligned16(p.fake) && stride_ok(p.cols, eb);  // fake's rows, gated's up
  const bool gated = is_gated(p.input_activation);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_kernel(gated ? quantize_rows_kernel<T, true> : quantize_rows_kernel<T, false>,
                  static_cast<unsigned>(p.rows), kRowThreads, 0, stream)(p, vec_ok);
    return 0;
  });
  return launch_status();
}

Status quant_linear(const QuantLinearParams& p, cudaStream_t stream) {
  using namespace detail;
  if (Status err = validate(p)) return err;
  if (p.rows == 0 || p.out_features == 0) return nullptr;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.rows <= kQuantGemvRows) {
      const unsigned grid =
          static_cast<unsigned>(ceil_div(p.out_features, kGemvThreads / kWarp));
      launch_kernel(p.rows <= 4 ? quant_gemv<T, 4> : quant_gemv<T, kQuantGemvRows>, grid,
                    kGemvThreads, 0, stream)(p);
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kTile)),
                      static_cast<unsigned>(ceil_div(p.out_features, kTile)));
      launch_kernel(quant_gemm<T>, grid, kTileThreads, 0, stream)(p);
    }
    return 0;
  });
  return launch_status();
}

size_t fake_quant_weight_workspace_bytes(int64_t numel) {
  return static_cast<size_t>(detail::weight_partials(numel)) * sizeof(float);
}

Status fake_quant_weight(const FakeQuantWeightParams& p, cudaStream_t stream) {
  using namespace detail;
  if (p.numel < 0) return "magneto cuda fake_quant_weight: negative size";
  if (!valid_dtype(p.dtype)) return "magneto cuda fake_quant_weight: unknown dtype code";
  if (p.numel == 0) return nullptr;
  const int64_t parts = weight_partials(p.numel);
  const bool given = p.absmean != nullptr;
  if (p.weight == nullptr || p.fake == nullptr ||
      (!given && (p.workspace == nullptr ||
                  p.workspace_bytes < static_cast<size_t>(parts) * sizeof(float))))
    return "magneto cuda fake_quant_weight: weight, fake and (no absmean) the workspace are "
           "required";
  const unsigned grid = static_cast<unsigned>(
      std::min<int64_t>(ceil_div(p.numel, kWeightThreads * 4), 4 * kMaxWeightPartials));
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (!given)
      launch_kernel(weight_abs_partials<T>, static_cast<unsigned>(parts), kWeightThreads, 0,
                    stream)(p, parts);
    launch_kernel(weight_fake<T>, grid, kWeightThreads, 0, stream)(p, parts);
    return 0;
  });
  return launch_status();
}

}  // namespace cuda
}  // namespace magneto
