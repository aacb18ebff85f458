// The int8 output projection (kernels.h, Int8Head): y = (x @ weight^T)·scale (+ bias), x in
// float32, bf16 or fp16, the weight int8 per output row, compiled once per instruction set.
//
// Decoding reads the weight (128256 × 2560 bytes at BitNet 2B-4T's head) once per token, for 1 to
// a few rows of x, so the kernel streams it: threads take blocks of output features (about
// kBlockBytes of weight, which stays in L2), and each block runs every tile of rows of x, the
// first tile reading the weight from memory and the others from L2. A tile is R ≤ kTileRows rows
// of x (as float32: converted once per call) against kTileCols weight rows, one float32 vector
// accumulator each; each weight vector is widened int8 → int32 → float32 once per tile and
// multiplied into every row (|q| ≤ 127 is exact in float32, so each product is x·q rounded once
// by the FMA). Each output element is one fixed-order sum, whichever thread computes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/rows.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace magneto::cpu::MAGNETO_ISA {
namespace {

// 4 × 4 accumulators: 16 of AVX-512's 32 registers, and with 4 weight vectors and one x vector
// 21; AVX2 (16 registers) takes 2 rows × 4 features (8 accumulators). Four features side by side
// keep four independent FMA chains in flight at one row (decoding).
#if defined(CPU_CAPABILITY_AVX2)
constexpr int kInt8TileRows = 2;
#else
constexpr int kInt8TileRows = 4;
#endif
constexpr int kInt8TileCols = 4;
constexpr int64_t kInt8BlockBytes = 128 << 10;

// kW int8 weights at p as float32 lanes.
inline Vec load_int8(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(64) float lanes[kW];
  for (int64_t l = 0; l < kW; ++l) lanes[l] = p[l];
  return Vec::loadu(lanes);
#endif
}

// count < kW weights, the lanes past them zero.
inline Vec load_int8_tail(const int8_t* p, int64_t count) {
  alignas(64) float lanes[kW] = {};
  for (int64_t l = 0; l < count; ++l) lanes[l] = p[l];
  return Vec::loadu(lanes);
}

// Keeps v in a register: GCC otherwise folds the load of an x vector into each FMA that uses it
// (as in few_rows.h).
inline void keep_in_register(Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  __asm__("" : "+v"(r));
  v = r;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  __asm__("" : "+x"(r));
  v = r;
#else
  (void)v;
#endif
}

struct Int8Operands {
  const Int8Head& a;
  const float* x;  // rows × in_features, float32
  int64_t x_stride;
};

// y[row + r][col + c] for R rows of x and C weight rows.
template <typename T, int R, int C>
inline void int8_tile(const Int8Operands& f, int64_t row, int64_t col) {
  const Int8Head& a = f.a;
  const int64_t k = a.in_features;
  VecReg acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.0f);
  const float* x = f.x + row * f.x_stride;
  const int8_t* w = a.weight + col * k;
  int64_t j = 0;
  for (; j + kW <= k; j += kW) {
    // the next tile's weight rows, a cache line each time this one crosses one: the hardware
    // prefetcher alone keeps too few lines in flight for C streams (docs/design.md, Decisions)
    if (j % 64 == 0) {
      for (int c = 0; c < C; ++c) __builtin_prefetch(w + (C + c) * k + j, 0, 3);
    }
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_int8(w + c * k + j);
    for (int r = 0; r < R; ++r) {
      Vec xv = Vec::loadu(x + r * f.x_stride + j);
      keep_in_register(xv);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], Vec(acc[r][c]));
    }
  }
  if (j < k) {  // the lanes past k are zero in both operands
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_int8_tail(w + c * k + j, k - j);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * f.x_stride + j, k - j);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], Vec(acc[r][c]));
    }
  }
  const T* scale = static_cast<const T*>(a.scale);
  const T* bias = static_cast<const T*>(a.bias);
  for (int r = 0; r < R; ++r) {
    T* y = static_cast<T*>(a.y) + (row + r) * a.y_stride + col;
    for (int c = 0; c < C; ++c) {
      const float dot = at::vec::vec_reduce_all<float>(
          [](const Vec& u, const Vec& v) { return u + v; }, Vec(acc[r][c]));
      const float out = dot * static_cast<float>(scale[col + c]);
      y[c] = static_cast<T>(bias != nullptr ? out + static_cast<float>(bias[col + c]) : out);
    }
  }
}

// The tile of rows_left (< kInt8TileRows) rows at (row, col).
template <typename T, int C, int R = kInt8TileRows - 1>
inline void int8_edge(const Int8Operands& f, int64_t rows_left, int64_t row, int64_t col) {
  if constexpr (R >= 1) {
    if (rows_left == R) return int8_tile<T, R, C>(f, row, col);
    int8_edge<T, C, R - 1>(f, rows_left, row, col);
  }
}

// Every row of x against the C weight rows at col.
template <typename T, int C>
inline void int8_columns(const Int8Operands& f, int64_t col) {
  int64_t row = 0;
  for (; row + kInt8TileRows <= f.a.rows; row += kInt8TileRows) {
    int8_tile<T, kInt8TileRows, C>(f, row, col);
  }
  if (row < f.a.rows) int8_edge<T, C>(f, f.a.rows - row, row, col);
}

}  // namespace

void int8_head(const Int8Head& a) {
  with_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    std::vector<float> converted;  // x as float32, once per call for bf16/fp16
    const float* x = static_cast<const float*>(a.x);
    int64_t x_stride = a.x_stride;
    if constexpr (!std::is_same_v<T, float>) {
      converted.resize(a.rows * a.in_features);
      at::parallel_for(0, a.rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          at::vec::convert(static_cast<const T*>(a.x) + r * a.x_stride,
                           converted.data() + r * a.in_features, a.in_features);
        }
      });
      x = converted.data();
      x_stride = a.in_features;
    }
    const Int8Operands f{a, x, x_stride};
    const int64_t tiles = a.out_features / kInt8TileCols;
    const int64_t tile_bytes = kInt8TileCols * std::max<int64_t>(a.in_features, 1);
    const int64_t grain = std::max<int64_t>(1, kInt8BlockBytes / tile_bytes);
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      // blocks of `grain` tiles, so that the weight of a block is read from memory once for
      // every row of x
      for (int64_t b = begin; b < end; b += grain) {
        const int64_t block_end = std::min(end, b + grain);
        int64_t row = 0;
        for (; row + kInt8TileRows <= a.rows; row += kInt8TileRows) {
          for (int64_t t = b; t < block_end; ++t) {
            int8_tile<T, kInt8TileRows, kInt8TileCols>(f, row, t * kInt8TileCols);
          }
        }
        if (row < a.rows) {
          for (int64_t t = b; t < block_end; ++t) {
            int8_edge<T, kInt8TileCols>(f, a.rows - row, row, t * kInt8TileCols);
          }
        }
      }
    });
    for (int64_t col = tiles * kInt8TileCols; col < a.out_features; ++col) {
      int8_columns<T, 1>(f, col);
    }
  });
}

}  // namespace magneto::cpu::MAGNETO_ISA
