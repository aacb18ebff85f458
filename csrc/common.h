// Definitions shared by the C++ CPU and the CUDA kernels. Torch-free: plain C++ that nvcc and the
// host compiler both accept.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define MAGNETO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MAGNETO_HOST_DEVICE inline
#endif

namespace magneto {

// The kernel codes of the op schema's strings, defined once for C++ and CUDA: each enum and, right
// under it, its name/code table, which csrc/checks.cpp parses the strings with (its error messages
// list the names from here) and magneto_kernels._C.codes() exposes, so that tests/test_codes.py
// checks them against magneto_kernels/codes.py, the Python side's one definition.
enum class Norm : int { kLayer = 0, kRms = 1, kNone = 2 };
// The gated input activations (x = [gate | up], in_act(x) = act(gate)·up, ln_linear only) are
// their gate's code with kGatedBit set: is_gated() and gate_of() take them apart.
enum class Activation : int {
  kNone = 0,
  kGelu = 1,
  kGeluTanh = 2,
  kRelu = 3,
  kSilu = 4,
  kRelu2 = 5,
  kGeglu = 16 | 1,
  kSwiglu = 16 | 4,
  kRelu2Glu = 16 | 5,
};
inline constexpr int kGatedBit = 16;
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// ln_linear's quantised projection (BitNet b1.58; magneto_kernels/quant.py has the formula):
// none, AutoBitLinear with master weights (fake-quantised, straight-through backward), with
// stored ternary weights times weight_scale, and BitLinear (divided by weight_scale).
enum class Quant : int { kNone = 0, kBitnetOnline = 1, kBitnetOffline = 2, kBitlinear = 3 };
// The offline modes' packed weight: (out_features, in_features / 4) uint8, in_features a multiple
// of kQuantPackUnit; in each block of 128 k (32 bytes), byte b holds the codes c = t + 1 of
// k = 32·i + b at bits 2i..2i+1, i = 0..3, so that shifting a 32-byte load by 2i and masking
// gives 32 consecutive codes (csrc/cpu/quant.h).
inline constexpr int kQuantPackUnit = 128;

// The modes whose weight is packed (inference only: no backward).
MAGNETO_HOST_DEVICE constexpr bool is_offline(Quant q) {
  return q == Quant::kBitnetOffline || q == Quant::kBitlinear;
}

template <typename Code>
struct NameCode {
  const char* name;
  Code code;
};

inline constexpr NameCode<Norm> kNorms[] = {
    {"layer", Norm::kLayer},
    {"rms", Norm::kRms},
    {"none", Norm::kNone},
};

inline constexpr NameCode<Quant> kQuants[] = {
    {"none", Quant::kNone},
    {"bitnet_online", Quant::kBitnetOnline},
    {"bitnet_offline", Quant::kBitnetOffline},
    {"bitlinear", Quant::kBitlinear},
};

inline constexpr NameCode<Activation> kActivations[] = {
    {"none", Activation::kNone},
    {"gelu", Activation::kGelu},
    {"gelu_tanh", Activation::kGeluTanh},
    {"relu", Activation::kRelu},
    {"silu", Activation::kSilu},
    {"relu2", Activation::kRelu2},
};

inline constexpr NameCode<Activation> kGatedActivations[] = {
    {"geglu", Activation::kGeglu},
    {"swiglu", Activation::kSwiglu},
    {"relu2_glu", Activation::kRelu2Glu},
};

MAGNETO_HOST_DEVICE constexpr bool is_gated(Activation a) {
  return (static_cast<int>(a) & kGatedBit) != 0;
}

// The activation of a gated activation's gate; a plain activation itself.
MAGNETO_HOST_DEVICE constexpr Activation gate_of(Activation a) {
  return static_cast<Activation>(static_cast<int>(a) & ~kGatedBit);
}

// Whether `code` has a row in `table`: the launchers' check of the codes they are given.
template <typename Code, size_t N>
constexpr bool in_table(const NameCode<Code> (&table)[N], Code code) {
  for (size_t i = 0; i < N; ++i) {
    if (table[i].code == code) return true;
  }
  return false;
}

// Philox4x32-10 (Salmon et al. 2011): the key increments and the round multipliers, used by the
// scalar philox below (CUDA and host), the vectorised one of csrc/cpu/philox.h, and equal to
// magneto_kernels/codes.py's PHILOX_* (tests/test_codes.py).
inline constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
inline constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
inline constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
inline constexpr int kPhiloxRounds = 10;

// Philox4x32-10 keyed by the 64-bit seed, counter = (index lo, index hi, 0, 0); returns the first
// output word. Bit-identical to magneto_kernels.reference.philox and to the Triton kernels, so
// every backend draws the same dropout mask.
MAGNETO_HOST_DEVICE uint32_t philox(uint64_t seed, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(prod_b);
    c2 = n2;
    c3 = static_cast<uint32_t>(prod_a);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// An element is kept iff philox(seed, index) >= dropout_threshold(p); kept values scale by 1/(1-p).
MAGNETO_HOST_DEVICE uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace magneto
