// Definitions shared by the C++ CPU and the CUDA kernels. Torch-free: plain C++ that nvcc and the
// host compiler both accept.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MAGNETO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MAGNETO_HOST_DEVICE inline
#endif

namespace magneto {

// The codes csrc/api.cpp passes to kernels (strings in the op schema).
enum class Norm : int { kLayer = 0, kRms = 1, kNone = 2 };
enum class Activation : int { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSilu = 4 };
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Philox4x32-10 keyed by the 64-bit seed, counter = (index lo, index hi, 0, 0); returns the first
// output word. Bit-identical to magneto_kernels.reference.philox and to the Triton kernels, so
// every backend draws the same dropout mask.
MAGNETO_HOST_DEVICE uint32_t philox(uint64_t seed, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(prod_b);
    c2 = n2;
    c3 = static_cast<uint32_t>(prod_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// An element is kept iff philox(seed, index) >= dropout_threshold(p); kept values scale by 1/(1-p).
MAGNETO_HOST_DEVICE uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace magneto
