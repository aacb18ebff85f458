// The few-row fp32 GEMM (kernels.h, LinearFewRows): ln_linear's forward GEMM at 1-16 rows on the
// AVX2 and AVX-512 builds.
#pragma once

#include "cpu/kernels.h"
#include "cpu/rows.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

// --------------------------------------------------------------------------- few-row linear

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)

// The tile of y that one pass over k computes: up to kTileRows rows of x against kTileCols rows
// of the weight, one vector accumulator each. Each weight row is streamed once per kTileRows rows
// of x: 8×2 fills 16 of AVX-512's 32 registers; AVX2 (16 registers) takes 4×2, which leaves
// room for the operands. (4×4 on AVX-512 streams the weight twice: docs/design.md, Decisions.)
constexpr int kTileRows = kW >= 16 ? 8 : 4;
constexpr int kTileCols = 2;

// Keeps v in a register: GCC otherwise folds the load of an x vector into each of the C FMAs
// that use it, loading it C times, which makes the loop load-bound (docs/design.md, Decisions).
inline void in_register(Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  __asm__("" : "+v"(r));
  v = r;
#else
  __m256 r = v;
  __asm__("" : "+x"(r));
  v = r;
#endif
}

// y[r][c] = x_r · w_c (+ bias[c]) for R ≤ kTileRows rows of x and C ≤ kTileCols weight rows.
template <int R, int C>
inline void few_rows_tile(const LinearFewRows& a, int64_t row, int64_t col) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.0f);
  const float* x = a.x + row * a.x_stride;
  const float* w = a.weight + col * a.weight_stride;
  // The tail's lanes past k load as zeros in both operands, so they add nothing.
  vec_loop(a.in_features, [&](int64_t j, int64_t count) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Vec::loadu(w + c * a.weight_stride + j, count);
    for (int r = 0; r < R; ++r) {
      Vec xv = Vec::loadu(x + r * a.x_stride + j, count);
      in_register(xv);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  });
  for (int r = 0; r < R; ++r) {
    float* y = a.y + (row + r) * a.y_stride + col;
    for (int c = 0; c < C; ++c) {
      const float dot = at::vec::vec_reduce_all<float>(
          [](const Vec& a, const Vec& b) { return a + b; }, acc[r][c]);
      y[c] = a.bias != nullptr ? dot + a.bias[col + c] : dot;
    }
  }
}

// The R-row tile at (row, col) for the R = rows left (1 ≤ R < kTileRows).
template <int C, int R = kTileRows - 1>
inline void few_rows_edge(const LinearFewRows& a, int64_t rows_left, int64_t row, int64_t col) {
  if constexpr (R >= 1) {
    if (rows_left == R) return few_rows_tile<R, C>(a, row, col);
    few_rows_edge<C, R - 1>(a, rows_left, row, col);
  }
}

// Every row of y at weight rows [col, col + C): full tiles, then the edge.
template <int C>
inline void few_rows_column(const LinearFewRows& a, int64_t col) {
  int64_t row = 0;
  for (; row + kTileRows <= a.rows; row += kTileRows) few_rows_tile<kTileRows, C>(a, row, col);
  if (row < a.rows) few_rows_edge<C>(a, a.rows - row, row, col);
}

#endif  // AVX2 or AVX-512

}  // namespace

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
void linear_few_rows(const LinearFewRows& a) {
  const int64_t tiles = a.out_features / kTileCols;
  // Threads split the weight rows, at least ~64 KiB of them per task.
  const int64_t tile_floats = kTileCols * std::max<int64_t>(a.in_features, 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / tile_floats);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) few_rows_column<kTileCols>(a, t * kTileCols);
  });
  for (int64_t col = tiles * kTileCols; col < a.out_features; ++col) few_rows_column<1>(a, col);
}
#endif

}  // namespace magneto::cpu::MAGNETO_ISA
