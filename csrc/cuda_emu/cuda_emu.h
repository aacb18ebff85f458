// An emulation of the CUDA execution model on the CPU, small and specific to what csrc/cuda's
// kernels use, so that CI runs them against the float64 reference (docs/design.md, Backends and
// dispatch). setup.py compiles csrc/cuda/*.cu as they are, as host C++ against it (the
// magneto_kernels._C_emu extension, MAGNETO_BUILD_CUDA_EMU=1): the kernel files launch through
// launch_kernel(kernel, grid, block, smem, stream)(args) and take dynamic shared memory through
// dynamic_shared<T>() (csrc/cuda/common.cuh), which a GPU build defines as <<<...>>> and
// `extern __shared__` and this file as below. csrc/cuda_emu/include/ stands in for the CUDA
// headers.
//
// The model: a launch runs its blocks one after another on the calling thread; within a block
// every CUDA thread is a fiber (ucontext) that runs until it reaches __syncthreads, a shuffle or
// its end. __syncthreads releases when every thread of the block waits at the same one; a shuffle
// completes when every lane of its mask has reached it (same call, mask and width), through a
// per-warp exchange. A barrier or shuffle that cannot complete (part of a block or warp reaches
// it, lanes at different calls, a lane outside the mask) fails the launch with a message that
// cudaGetLastError/cudaGetErrorString report. Fibers are resumed in thread order, the direction
// alternating at each barrier release, so that a missing barrier between a write and the reads
// of other threads shows up in more cases; it is no race detector (docs/design.md, Traps).
// __half/__nv_bfloat16 convert with round-to-nearest-even; the math functions are libm's, so
// --use_fast_math numerics are not reproduced.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Block-shared: one instance per OS thread, which runs a launch's blocks one at a time.
#define __shared__ static thread_local

// ------------------------------------------------------------------ vector and index types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// ------------------------------------------------------------------ runtime API
using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
};
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace magneto::cuda_emu {

// The emulated device: few SMs, so that grids sized by SM count are small and the kernels' row
// and column loops run more than once on test-sized inputs.
inline constexpr int kSms = 2;
inline constexpr int kThreadsPerSm = 2048;
inline constexpr int kBlocksPerSm = 16;
inline constexpr int kSharedPerSm = 100 * 1024;
inline constexpr int kSharedPerBlock = 48 * 1024;

int occupancy(int block_threads, size_t dynamic_smem);

// ------------------------------------------------------------------ builtin variables
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  void* dynamic_smem;
};
inline thread_local Builtins builtins{};

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(builtins.dynamic_smem);
}

// ------------------------------------------------------------------ barriers and shuffles
void sync_threads(const char* file, int line);

enum class Shfl : int { kIdx, kUp, kDown, kXor };
uint64_t shuffle_bits(Shfl kind, const char* file, int line, unsigned mask, uint64_t bits, int arg,
                      int width);

template <typename T>
T shuffle(Shfl kind, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle_bits(kind, file, line, mask, bits, arg, width);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// ------------------------------------------------------------------ launches
// Runs `body(params)` as every thread of every block; errors go to cudaGetLastError.
void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(const void*),
              const void* params);

template <typename... P>
struct Launch {
  std::string name;  // where the launch is, file:line, for its error messages
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  // The arguments converted to the kernel's parameter types once, as a call would; every
  // thread then gets its own by-value copy.
  template <typename... A>
  void operator()(A&&... args) const {
    struct Frame {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    };
    const Frame frame{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(name.c_str(), grid, block, smem,
             [](const void* f) {
               const Frame& fr = *static_cast<const Frame*>(f);
               std::apply(fr.kernel, fr.params);
             },
             &frame);
  }
};

template <typename... P>
Launch<P...> launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                           cudaStream_t stream = nullptr,
                           std::source_location where = std::source_location::current()) {
  (void)stream;  // one in-order stream: launches run when made
  std::string file = where.file_name();
  file = file.substr(file.rfind('/') + 1);
  return {file + ":" + std::to_string(where.line()), kernel, grid, block, smem};
}

// ------------------------------------------------------------------ 16-bit floats
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN stays a (quiet) NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds to infinity (65520 and up)
  if (ax < 0x38800000u) {                        // below 2^-14: a subnormal half, units 2^-24
    const float scaled = bits_float(ax) * 16777216.0f;  // exact: a power-of-two scale
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));  // ties to even
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);  // ties to even on 13 dropped bits
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);  // rebias 127 -> 15
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return bits_float(float_bits(v) | sign);
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);  // ties to even
}

}  // namespace magneto::cuda_emu

#define threadIdx (::magneto::cuda_emu::builtins.thread_idx)
#define blockIdx (::magneto::cuda_emu::builtins.block_idx)
#define blockDim (::magneto::cuda_emu::builtins.block_dim)
#define gridDim (::magneto::cuda_emu::builtins.grid_dim)
#define warpSize 32

#define __syncthreads() ::magneto::cuda_emu::sync_threads(__FILE__, __LINE__)
#define __shfl_sync(...) \
  ::magneto::cuda_emu::shuffle(::magneto::cuda_emu::Shfl::kIdx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) \
  ::magneto::cuda_emu::shuffle(::magneto::cuda_emu::Shfl::kUp, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) \
  ::magneto::cuda_emu::shuffle(::magneto::cuda_emu::Shfl::kDown, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) \
  ::magneto::cuda_emu::shuffle(::magneto::cuda_emu::Shfl::kXor, __FILE__, __LINE__, __VA_ARGS__)

template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K kernel, int block_threads,
                                                          size_t dynamic_smem) {
  (void)kernel;  // registers are not modelled: threads and shared memory limit occupancy
  *blocks = ::magneto::cuda_emu::occupancy(block_threads, dynamic_smem);
  return *blocks > 0 ? cudaSuccess : cudaErrorInvalidValue;
}

// ------------------------------------------------------------------ 16-bit float types
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return ::magneto::cuda_emu::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {::magneto::cuda_emu::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  return ::magneto::cuda_emu::bits_float(static_cast<uint32_t>(b.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return {::magneto::cuda_emu::float_to_bfloat16_bits(f)};
}

// ------------------------------------------------------------------ math
// expf, erff and fmaf are libm's; CUDA's rsqrtf (2 ulp) as a correctly rounded division.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// __fdiv_rn: the IEEE division that --use_fast_math keeps for it (rintf, libm's, rounds half to
// even as CUDA's does).
inline float __fdiv_rn(float a, float b) { return a / b; }

// ------------------------------------------------------------------ integer intrinsics
// __dp4a(a, b, c): c plus the four products of the signed bytes of a and b, wrapping modulo 2^32
// as the hardware's 32-bit add does.
inline int __dp4a(int a, int b, int c) {
  uint32_t acc = static_cast<uint32_t>(c);
  for (int i = 0; i < 4; ++i) {
    const int ai = static_cast<int8_t>(static_cast<uint32_t>(a) >> (8 * i));
    const int bi = static_cast<int8_t>(static_cast<uint32_t>(b) >> (8 * i));
    acc += static_cast<uint32_t>(ai * bi);
  }
  return static_cast<int>(acc);
}
