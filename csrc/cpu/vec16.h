// 16 values of a row at a time on 512-bit registers, in the dtypes the kernels take (float32,
// bf16, fp16), converted as c10's scalar conversions convert: the quantised kernels' epilogues
// (quant.h) read, round and store their outputs with these. AVX-512 build only.
#pragma once

#include <type_traits>

#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace magneto::cpu::MAGNETO_ISA {
namespace {

// 16 values of T (masked by m: the lanes past a row's end) as float32.
template <typename T>
__m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_cvtph_ps(bits);
    }
  }
}

// v rounded to T (bf16 or fp16) as its 16-bit patterns, as c10's scalar conversions round:
// to nearest even, bf16's NaN to 0x7FC0 (fp16's by F16C).
template <typename T>
__m256i to_bits16(__m512 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                    _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
  } else {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

// round_to<T> of 16 values.
template <typename T>
__m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bits16<T>(v)), 16));
  } else {
    return _mm512_cvtph_ps(to_bits16<T>(v));
  }
}

template <typename T>
void store16(T* p, __mmask16 m, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    _mm256_mask_storeu_epi16(p, m, to_bits16<T>(v));
  }
}

}  // namespace
}  // namespace magneto::cpu::MAGNETO_ISA
