// Device helpers shared by the CUDA kernels: dtype conversion, 16-byte vector loads and stores
// with a scalar fallback, activations and their derivatives, row-group reductions, and the
// host-side dispatch from runtime codes to template instantiations. Internal to csrc/cuda.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common.h"
#include "cuda/kernels.h"

namespace magneto {
namespace cuda {
namespace detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreadsPerRow = 512;  // row-group size limit of the row kernels

// ------------------------------------------------------------------ element types and conversion

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Convert<T>::to(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Convert<T>::from(v);
}
// v rounded to T and back: the value a T tensor would hold.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Elements of T per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// ------------------------------------------------------------------ vector loads and stores
// N consecutive elements of S starting at p, as floats. `valid` = how many of them exist (may be
// <= 0: nothing is read). The 16-byte path needs vec_ok (the caller checked that p is 16-byte
// aligned) and all N elements present; otherwise elements are read one by one and the missing
// ones are zero. The 16 bytes move by memcpy from a pointer assumed 16-byte aligned: nvcc emits
// the same 128-bit load/store as a uint4 pun would, and it is well-defined C++ (g++ -O2 with
// strict aliasing miscompiles the pun when the kernels are compiled for the CPU, csrc/cuda_emu).
template <typename S, int N>
__device__ __forceinline__ void load_vec(const S* p, int valid, bool vec_ok, float (&out)[N]) {
  constexpr int kPer = kVec<S>;
  static_assert(N % kPer == 0, "N must be a whole number of 16-byte vectors of S");
  if (vec_ok && valid >= N) {
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      alignas(16) S e[kPer];
      __builtin_memcpy(e, __builtin_assume_aligned(static_cast<const void*>(p + c * kPer), 16),
                       16);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[c * kPer + i] = to_float(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = i < valid ? to_float(p[i]) : 0.0f;
  }
}

// Stores the first min(valid, N) values of `in` (rounded to S) at p; same vector rule as load_vec.
template <typename S, int N>
__device__ __forceinline__ void store_vec(S* p, int valid, bool vec_ok, const float (&in)[N]) {
  constexpr int kPer = kVec<S>;
  static_assert(N % kPer == 0, "N must be a whole number of 16-byte vectors of S");
  if (vec_ok && valid >= N) {
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      alignas(16) S e[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) e[i] = from_float<S>(in[c * kPer + i]);
      __builtin_memcpy(__builtin_assume_aligned(static_cast<void*>(p + c * kPer), 16), e, 16);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < valid) p[i] = from_float<S>(in[i]);
  }
}

// A norm parameter vector (gamma or beta) stored as T or float32 (param_f32); `fill` when absent.
template <typename T, int N>
__device__ __forceinline__ void load_param(const void* p, bool param_f32, int col, int valid,
                                           bool vec_ok, float fill, float (&out)[N]) {
  if (p == nullptr) {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = fill;
  } else if (param_f32) {
    load_vec<float, N>(static_cast<const float*>(p) + col, valid, vec_ok, out);
  } else {
    load_vec<T, N>(static_cast<const T*>(p) + col, valid, vec_ok, out);
  }
}

// ------------------------------------------------------------------ activations
// tanh from one exponential: exact at the limits (exp overflow gives 1, underflow -1) and with an
// absolute error of a few float32 ulps of 1 elsewhere, also under --use_fast_math.
__device__ __forceinline__ float tanh_from_exp(float v) {
  return 1.0f - 2.0f / (1.0f + expf(2.0f * v));
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCubic = 0.044715f;

template <Activation A>
__device__ __forceinline__ float act_forward(float x) {
  if constexpr (A == Activation::kNone) {
    return x;
  } else if constexpr (A == Activation::kGelu) {
    return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = tanh_from_exp(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x));
    return 0.5f * x * (1.0f + t);
  } else if constexpr (A == Activation::kRelu) {
    return x > 0.0f ? x : 0.0f;
  } else if constexpr (A == Activation::kRelu2) {
    const float r = x > 0.0f ? x : 0.0f;
    return r * r;
  } else {
    static_assert(A == Activation::kSilu, "act_forward takes a plain activation");
    return x / (1.0f + expf(-x));
  }
}

// d act / dx at x (relu, relu2: 0 at x == 0, as torch).
template <Activation A>
__device__ __forceinline__ float act_derivative(float x) {
  if constexpr (A == Activation::kNone) {
    return 1.0f;
  } else if constexpr (A == Activation::kGelu) {
    const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
    return cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  } else if constexpr (A == Activation::kGeluTanh) {
    const float x2 = x * x;
    const float t = tanh_from_exp(kSqrt2OverPi * x * (1.0f + kGeluTanhCubic * x2));
    return 0.5f * (1.0f + t) +
           0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * x2);
  } else if constexpr (A == Activation::kRelu) {
    return x > 0.0f ? 1.0f : 0.0f;
  } else if constexpr (A == Activation::kRelu2) {
    return x > 0.0f ? 2.0f * x : 0.0f;
  } else {
    static_assert(A == Activation::kSilu, "act_derivative takes a plain activation");
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
  }
}

// Template argument standing for "the activation is the runtime code": the wide-row kernels,
// rarely used, take it to keep the number of instantiations (and CI's compile time) down. For a
// gated input activation the runtime code is the gate's (gate_of), and whether the row is gated
// is a template flag of those kernels: it changes what they load.
constexpr Activation kRuntimeActivation = static_cast<Activation>(-1);

template <Activation A>
__device__ __forceinline__ bool has_activation(Activation runtime) {
  if constexpr (A == kRuntimeActivation) return runtime != Activation::kNone;
  return A != Activation::kNone;
}

// act_forward / act_derivative for a template or (A == kRuntimeActivation) runtime activation.
template <Activation A>
__device__ __forceinline__ float activation(float x, Activation runtime) {
  if constexpr (A != kRuntimeActivation) {
    return act_forward<A>(x);
  } else {
    switch (runtime) {
      case Activation::kGelu: return act_forward<Activation::kGelu>(x);
      case Activation::kGeluTanh: return act_forward<Activation::kGeluTanh>(x);
      case Activation::kRelu: return act_forward<Activation::kRelu>(x);
      case Activation::kSilu: return act_forward<Activation::kSilu>(x);
      case Activation::kRelu2: return act_forward<Activation::kRelu2>(x);
      default: return x;
    }
  }
}

template <Activation A>
__device__ __forceinline__ float activation_derivative(float x, Activation runtime) {
  if constexpr (A != kRuntimeActivation) {
    return act_derivative<A>(x);
  } else {
    switch (runtime) {
      case Activation::kGelu: return act_derivative<Activation::kGelu>(x);
      case Activation::kGeluTanh: return act_derivative<Activation::kGeluTanh>(x);
      case Activation::kRelu: return act_derivative<Activation::kRelu>(x);
      case Activation::kSilu: return act_derivative<Activation::kSilu>(x);
      case Activation::kRelu2: return act_derivative<Activation::kRelu2>(x);
      default: return 1.0f;
    }
  }
}

// a = round_T(act(gate)*up) for one element of a gated row (x = [gate | up]), computed in float32
// and rounded once, as the other input activations. A: the gate's activation, or
// kRuntimeActivation for the code `runtime` (gate_of of the gated code).
template <typename T, Activation A>
__device__ __forceinline__ float gated_act(float gate, float up, Activation runtime) {
  return round_to<T>(activation<A>(gate, runtime) * up);
}

// ------------------------------------------------------------------ reductions
// Butterfly sums: every lane ends with the bitwise-identical total (float addition commutes).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sums (a, b) over the `tpr` consecutive threads of a row group (tpr a power of two in 32..512
// dividing blockDim.x). Every thread of the block must call it with the same tpr; above one warp
// it synchronises the block. `buf` holds blockDim.x/32 float2; consecutive calls must alternate
// between two buffers (a buffer is rewritten only after the next call's __syncthreads, by which
// time every thread has finished reading it). All threads of a group get identical totals.
__device__ __forceinline__ float2 group_sum2(float a, float b, int tpr, float2* buf) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (tpr == kWarp) return make_float2(a, b);
  if (threadIdx.x % kWarp == 0) buf[threadIdx.x / kWarp] = make_float2(a, b);
  __syncthreads();
  const int first = (static_cast<int>(threadIdx.x) / tpr) * (tpr / kWarp);
  float2 s = make_float2(0.0f, 0.0f);
  for (int w = 0; w < tpr / kWarp; ++w) {
    s.x += buf[first + w].x;
    s.y += buf[first + w].y;
  }
  return s;
}

// For column tiles of blockDim (TX, TY) where thread (x, y) holds partial sums acc[VEC] of
// columns c0..c0+VEC-1 (c0 = (blockIdx.x*TX + x)*VEC): adds the TY partials of each column in a
// fixed order and writes them as row blockIdx.y of `dst` ([gridDim.y, cols]). Block-uniform.
template <int TX, int TY, int VEC>
__device__ __forceinline__ void write_tile_partial(const float (&acc)[VEC], float* dst, int cols,
                                                   int c0, float (*tile)[TX * VEC]) {
  __syncthreads();  // a previous call's readers are done with `tile`
#pragma unroll
  for (int i = 0; i < VEC; ++i) tile[threadIdx.y][threadIdx.x * VEC + i] = acc[i];
  __syncthreads();
  if (threadIdx.y == 0) {
    float* out = dst + static_cast<int64_t>(blockIdx.y) * cols;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (c0 + i >= cols) break;
      float s = 0.0f;
#pragma unroll
      for (int y = 0; y < TY; ++y) s += tile[y][threadIdx.x * VEC + i];
      out[c0 + i] = s;
    }
  }
}

// ------------------------------------------------------------------ launches and shared memory
// The two constructs that host C++ lacks, written so that the kernel files compile as they are for
// a GPU and, against csrc/cuda_emu, for the CPU: launch_kernel(kernel, grid, block, smem,
// stream)(args...) is kernel<<<grid, block, smem, stream>>>(args...), and dynamic_shared<T>() the
// block's `extern __shared__` memory as T*.
#ifdef MAGNETO_CUDA_EMULATE
using ::magneto::cuda_emu::dynamic_shared;
using ::magneto::cuda_emu::launch_kernel;
#else
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;

  template <typename... A>
  void operator()(A&&... args) const {
    kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  }
};

template <typename... P>
Launch<P...> launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                           cudaStream_t stream = nullptr) {
  return {kernel, grid, block, smem, stream};
}

template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return reinterpret_cast<T*>(shared_bytes);
}
#endif

// ------------------------------------------------------------------ host helpers

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
// A row stride keeps every row start 16-byte aligned.
inline bool stride_ok(int64_t stride, int elem_bytes) { return (stride * elem_bytes) % 16 == 0; }

inline int elem_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }
inline bool valid_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kBFloat16 || d == DType::kFloat16;
}

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Streaming multiprocessors of the current device (0 if it cannot be queried).
inline int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return sms;
}

// The status of the launches just made: nullptr or the CUDA error's message.
inline Status launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
struct Tag {
  using type = T;
};
template <Activation A>
using ActTag = std::integral_constant<Activation, A>;

// f(Tag<T>{}) for the element type of `d`.
template <typename F>
auto dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16:
      return f(Tag<__half>{});
    default:
      return f(Tag<float>{});
  }
}

// f(ActTag<A>{}) for the activation code `a` (callers validate the code first).
template <typename F>
auto dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kGelu:
      return f(ActTag<Activation::kGelu>{});
    case Activation::kGeluTanh:
      return f(ActTag<Activation::kGeluTanh>{});
    case Activation::kRelu:
      return f(ActTag<Activation::kRelu>{});
    case Activation::kSilu:
      return f(ActTag<Activation::kSilu>{});
    case Activation::kRelu2:
      return f(ActTag<Activation::kRelu2>{});
    default:
      return f(ActTag<Activation::kNone>{});
  }
}

// dispatch_activation for an input activation, which may also be a gated code: the norm kernels
// take it whole as their template argument and split it with gate_of / is_gated.
template <typename F>
auto dispatch_input_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kGeglu:
      return f(ActTag<Activation::kGeglu>{});
    case Activation::kSwiglu:
      return f(ActTag<Activation::kSwiglu>{});
    case Activation::kRelu2Glu:
      return f(ActTag<Activation::kRelu2Glu>{});
    default:
      return dispatch_activation(a, f);
  }
}

inline bool valid_activation(Activation a) { return in_table(kActivations, a); }
inline bool valid_input_activation(Activation a) {
  return valid_activation(a) || in_table(kGatedActivations, a);
}

// Stage two of the deterministic column reductions (reduce.cu): out[c] = sum_p partials[p, c]
// in a fixed order, rounded to out_dtype; zeros when num_partials == 0.
Status column_sum(const float* partials, int64_t num_partials, int64_t cols, void* out,
                  DType out_dtype, cudaStream_t stream);

}  // namespace detail
}  // namespace cuda
}  // namespace magneto
