// The few-row GEMM (kernels.h, LinearFewRows): ln_linear's forward GEMM at 1-16 rows on the AVX2
// and AVX-512 builds, in float32, bf16 or fp16.
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

// count (≤ kW) values of T from p as float lanes, the rest zero.
template <typename T>
inline Vec load_floats(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, count);
  } else {
    // kW values of T fill half a Vectorized<T>, whose conversion gives two float vectors
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count)));
  }
}

// The operands of a tile: x as float32 rows (converted once for the whole call when stored in
// bf16/fp16), the weight, bias and y in T.
template <typename T>
struct FewRows {
  const LinearFewRows& a;
  const float* x;
  int64_t x_stride;
  const T* weight() const { return static_cast<const T*>(a.weight); }
  const T* bias() const { return static_cast<const T*>(a.bias); }
  T* y() const { return static_cast<T*>(a.y); }
};

// y[r][c] = x_r · w_c (+ bias[c]) for R ≤ kTileRows rows of x and C ≤ kTileCols weight rows.
template <int R, int C, typename T>
inline void few_rows_tile(const FewRows<T>& f, int64_t row, int64_t col) {
  const LinearFewRows& a = f.a;
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.0f);
  const float* x = f.x + row * f.x_stride;
  const T* w = f.weight() + col * a.weight_stride;
  // The tail's lanes past k load as zeros in both operands, so they add nothing.
  vec_loop(a.in_features, [&](int64_t j, int64_t count) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_floats(w + c * a.weight_stride + j, count);
    for (int r = 0; r < R; ++r) {
      Vec xv = Vec::loadu(x + r * f.x_stride + j, count);
      in_register(xv);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  });
  for (int r = 0; r < R; ++r) {
    T* y = f.y() + (row + r) * a.y_stride + col;
    for (int c = 0; c < C; ++c) {
      const float dot = at::vec::vec_reduce_all<float>(
          [](const Vec& a, const Vec& b) { return a + b; }, acc[r][c]);
      y[c] = static_cast<T>(a.bias != nullptr ? dot + static_cast<float>(f.bias()[col + c])
                                              : dot);
    }
  }
}

// The R-row tile at (row, col) for the R = rows left (1 ≤ R < kTileRows).
template <int C, typename T, int R = kTileRows - 1>
inline void few_rows_edge(const FewRows<T>& f, int64_t rows_left, int64_t row, int64_t col) {
  if constexpr (R >= 1) {
    if (rows_left == R) return few_rows_tile<R, C>(f, row, col);
    few_rows_edge<C, T, R - 1>(f, rows_left, row, col);
  }
}

// Every row of y at weight rows [col, col + C): full tiles, then the edge.
template <int C, typename T>
inline void few_rows_column(const FewRows<T>& f, int64_t col) {
  int64_t row = 0;
  for (; row + kTileRows <= f.a.rows; row += kTileRows) few_rows_tile<kTileRows, C>(f, row, col);
  if (row < f.a.rows) few_rows_edge<C>(f, f.a.rows - row, row, col);
}

#endif  // AVX2 or AVX-512

}  // namespace

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
void linear_few_rows(const LinearFewRows& a) {
  with_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    // x as float32: converted once here for bf16/fp16 (at most 16 rows), so that the tiles
    // convert only the weight they stream
    std::vector<float> converted;
    const float* x = static_cast<const float*>(a.x);
    int64_t x_stride = a.x_stride;
    if constexpr (!std::is_same_v<T, float>) {
      converted.resize(a.rows * a.in_features);
      for (int64_t r = 0; r < a.rows; ++r) {
        at::vec::convert(static_cast<const T*>(a.x) + r * a.x_stride,
                         converted.data() + r * a.in_features, a.in_features);
      }
      x = converted.data();
      x_stride = a.in_features;
    }
    const FewRows<T> f{a, x, x_stride};
    const int64_t tiles = a.out_features / kTileCols;
    // Threads split the weight rows, at least ~64 KiB of them per task.
    const int64_t tile_bytes = kTileCols * std::max<int64_t>(a.in_features, 1) * sizeof(T);
    const int64_t grain = std::max<int64_t>(1, 65536 / tile_bytes);
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) few_rows_column<kTileCols>(f, t * kTileCols);
    });
    for (int64_t col = tiles * kTileCols; col < a.out_features; ++col) few_rows_column<1>(f, col);
  });
}
#endif

}  // namespace magneto::cpu::MAGNETO_ISA
