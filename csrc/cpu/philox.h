// Philox4x32-10 dropout on float32 vectors: the factors 0 or 1/(1-p) of consecutive output
// elements, bit-identical to common.h's scalar philox (and so to every backend's mask).
#pragma once

#include <cstdint>

#include "cpu/rows.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

// ---------------------------------------------------------------------------------- dropout

// Per-element dropout factors for elements [index, index + count) of the output: 1/(1−p) where
// philox(seed, index) >= threshold, 0 elsewhere (the mask of reference.dropout_mask).
struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  float scale;

  Dropout(uint64_t seed_, double p)
      : seed(seed_), threshold(dropout_threshold(p)), scale(static_cast<float>(1.0 / (1.0 - p))) {}

  // common.h's philox (Philox4x32-10, first output word) for kW consecutive indices, laid out
  // lane-wise in 64-bit lanes holding 32-bit words, so that the compiler turns each round into a
  // few vector instructions (32×32→64-bit multiplies).
  void philox_lanes(uint64_t index, uint32_t* out) const {
    constexpr uint64_t kLo = 0xFFFFFFFFu;
    uint64_t c0[kW], c1[kW], c2[kW], c3[kW];
    for (int64_t l = 0; l < kW; ++l) {
      const uint64_t i = index + static_cast<uint64_t>(l);
      c0[l] = i & kLo;
      c1[l] = i >> 32;
      c2[l] = 0;
      c3[l] = 0;
    }
    uint64_t k0 = seed & kLo, k1 = seed >> 32;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int64_t l = 0; l < kW; ++l) {
        const uint64_t prod_b = uint64_t{kPhiloxRoundB} * (c2[l] & kLo);
        const uint64_t prod_a = uint64_t{kPhiloxRoundA} * (c0[l] & kLo);
        const uint64_t n0 = (prod_b >> 32) ^ c1[l] ^ k0;
        const uint64_t n2 = (prod_a >> 32) ^ c3[l] ^ k1;
        c0[l] = n0;
        c1[l] = prod_b & kLo;
        c2[l] = n2;
        c3[l] = prod_a & kLo;
      }
      k0 = (k0 + kPhiloxKeyA) & kLo;
      k1 = (k1 + kPhiloxKeyB) & kLo;
    }
    for (int64_t l = 0; l < kW; ++l) out[l] = static_cast<uint32_t>(c0[l]);
  }

  Vec factors(uint64_t index, int64_t count) const {
    uint32_t bits[kW];
    philox_lanes(index, bits);
    alignas(64) float f[kW];
    for (int64_t l = 0; l < kW; ++l) f[l] = (l < count && bits[l] >= threshold) ? scale : 0.0f;
    return Vec::loadu(f);
  }
};

}  // namespace

}  // namespace magneto::cpu::MAGNETO_ISA
