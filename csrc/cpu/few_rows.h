// The few-row GEMM (kernels.h, LinearFewRows): ln_linear's forward GEMM at 1-16 rows on the AVX2
// and AVX-512 builds, in float32, bf16 or fp16.
#pragma once

#include "cpu/kernels.h"
#include "cpu/rows.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "cpu/quant_amx.h"  // amx_enabled, amx_configure, amx_release: the tile state
#endif

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
// At one row the tile is 1×4: four weight rows streamed at once (and four prefetched) keep more
// lines in flight from memory than two (docs/design.md, Decisions).
constexpr int kOneRowTileCols = 4;

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

// Threads split the weight rows in column tiles, at least ~64 KiB of weight per task.
inline int64_t column_grain(const LinearFewRows& a, int64_t value_bytes,
                            int64_t tile_cols = kTileCols) {
  const int64_t tile_bytes = tile_cols * std::max<int64_t>(a.in_features, 1) * value_bytes;
  return std::max<int64_t>(1, 65536 / tile_bytes);
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

// y[r][c] = x_r · w_c (+ bias[c]) for R ≤ kTileRows rows of x and C ≤ kOneRowTileCols weight
// rows.
template <int R, int C, typename T>
inline void few_rows_tile(const FewRows<T>& f, int64_t row, int64_t col) {
  const LinearFewRows& a = f.a;
  VecReg acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.0f);
  const float* x = f.x + row * f.x_stride;
  const T* w = f.weight() + col * a.weight_stride;
  // The tail's lanes past k load as zeros in both operands, so they add nothing.
  vec_loop(a.in_features, [&](int64_t j, int64_t count) {
    // the next tile's weight rows, a cache line each time this one crosses one: the hardware
    // prefetcher alone keeps too few lines in flight (docs/design.md, Decisions)
    if (j * static_cast<int64_t>(sizeof(T)) % 64 == 0) {
      for (int c = 0; c < C; ++c) __builtin_prefetch(w + (C + c) * a.weight_stride + j, 0, 3);
    }
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_floats(w + c * a.weight_stride + j, count);
    for (int r = 0; r < R; ++r) {
      Vec xv = Vec::loadu(x + r * f.x_stride + j, count);
      in_register(xv);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], Vec(acc[r][c]));
    }
  });
  for (int r = 0; r < R; ++r) {
    T* y = f.y() + (row + r) * a.y_stride + col;
    for (int c = 0; c < C; ++c) {
      const float dot = at::vec::vec_reduce_all<float>(
          [](const Vec& a, const Vec& b) { return a + b; }, Vec(acc[r][c]));
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

#if defined(CPU_CAPABILITY_AVX512)

// bf16 on a CPU with AVX512-BF16: VDPBF16PS multiplies 32 bf16 pairs of x and the weight as they
// are stored and adds each pair's two products to one of 16 float32 lanes, so neither operand is
// converted, x stays bf16 (half the bytes in L1) and each instruction covers 32 k instead of 16.
// The instruction treats denormal inputs and results as zero (bf16's normal range starts at
// ~1.2e-38, as float32's). A separate function with its own target: the AVX-512 build does not
// assume the extension, and GCC does not carry a target attribute into lambdas, so these are
// plain loops. Chosen per call where CPUID lists it, unless MAGNETO_CPU_BF16_DOT=0 (read per
// call, so that tests run both kernels in one process).
inline bool bf16_dot_enabled() {
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  const char* env = std::getenv("MAGNETO_CPU_BF16_DOT");
  return available && !(env != nullptr && std::strcmp(env, "0") == 0);
}

// The k-steps of one tile: 32 k per step, the tail's lanes past k loaded as zeros in both
// operands.
template <int R, int C>
__attribute__((target("avx512bf16"))) inline void bf16_dot_tile(const LinearFewRows& a,
                                                                 int64_t row, int64_t col) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const auto* x = static_cast<const uint16_t*>(a.x) + row * a.x_stride;
  const auto* w = static_cast<const uint16_t*>(a.weight) + col * a.weight_stride;
  for (int64_t j = 0; j < a.in_features; j += 32) {
    const int64_t left = a.in_features - j;
    const __mmask32 mask = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
    __m512i wv[C];
    for (int c = 0; c < C; ++c) {
      wv[c] = _mm512_maskz_loadu_epi16(mask, w + c * a.weight_stride + j);
    }
    for (int r = 0; r < R; ++r) {
      __m512i xv = _mm512_maskz_loadu_epi16(mask, x + r * a.x_stride + j);
      __asm__("" : "+v"(xv));  // one load of x per step (see in_register)
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)xv, (__m512bh)wv[c]);
      }
    }
  }
  auto* y = static_cast<at::BFloat16*>(a.y);
  const auto* bias = static_cast<const at::BFloat16*>(a.bias);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const float dot = _mm512_reduce_add_ps(acc[r][c]);
      y[(row + r) * a.y_stride + col + c] =
          static_cast<at::BFloat16>(bias != nullptr ? dot + static_cast<float>(bias[col + c])
                                                    : dot);
    }
  }
}

template <int C, int R = kTileRows - 1>
__attribute__((target("avx512bf16"))) inline void bf16_dot_edge(const LinearFewRows& a,
                                                                 int64_t rows_left, int64_t row,
                                                                 int64_t col) {
  if constexpr (R >= 1) {
    if (rows_left == R) return bf16_dot_tile<R, C>(a, row, col);
    bf16_dot_edge<C, R - 1>(a, rows_left, row, col);
  }
}

// Weight rows [begin, end) of y (in kTileCols columns, the last one alone where end is odd),
// every row of x each.
__attribute__((target("avx512bf16"), noinline)) void bf16_dot_columns(const LinearFewRows& a,
                                                                      int64_t begin,
                                                                      int64_t end) {
  for (int64_t col = begin; col < end; col += kTileCols) {
    const bool pair = col + kTileCols <= end;
    int64_t row = 0;
    for (; row + kTileRows <= a.rows; row += kTileRows) {
      pair ? bf16_dot_tile<kTileRows, kTileCols>(a, row, col)
           : bf16_dot_tile<kTileRows, 1>(a, row, col);
    }
    if (row < a.rows) {
      pair ? bf16_dot_edge<kTileCols>(a, a.rows - row, row, col)
           : bf16_dot_edge<1>(a, a.rows - row, row, col);
    }
  }
}

// bf16 on AMX-BF16 tiles, where quant_amx.h's amx_enabled() holds (CPUID, the OS's grant of the
// tile state, MAGNETO_CPU_AMX) and CPUID lists AMX-BF16: TDPBF16PS multiplies 16 weight rows ×
// 32 k, loaded as stored (row stride weight_stride), by x rearranged once per call into 32-k
// blocks of 16 k pairs × 16 rows (rows past `rows` and k past in_features zero), accumulating
// 16 weight rows × 16 rows of y in float32: every weight row is read once for all rows, with no
// packing of the weight, where the BLAS pack it. A group of fewer than 16 weight rows, or a last
// block of fewer than 32 k, is copied into zeros first, so that no tile reads past the weight.
// Each output is one fixed-order sum, whichever thread computes it.
inline bool amx_bf16_enabled() {
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-bf16") != 0;
  }();
  return bf16 && amx_enabled();
}

constexpr int64_t kAmxPairs = kAmxTileK / 4;                 // k pairs of a block: 16
constexpr int64_t kAmxBlockValues = kAmxTile * kAmxTileK / 2;  // bf16 values of a tile: 512

// x as TDPBF16PS's second operand: row i of block b holds, for each row n of x, the pair
// x[n][32·b + 2i], x[n][32·b + 2i + 1].
inline void amx_pack_x_bf16(const LinearFewRows& a, int64_t blocks, uint16_t* packed) {
  std::fill(packed, packed + blocks * kAmxBlockValues, uint16_t{0});
  const auto* x = static_cast<const uint16_t*>(a.x);
  for (int64_t n = 0; n < a.rows; ++n) {
    for (int64_t k = 0; k < a.in_features; ++k) {
      const int64_t b = k / (2 * kAmxPairs), i = (k / 2) % kAmxPairs;
      packed[b * kAmxBlockValues + i * 2 * kAmxTile + 2 * n + k % 2] = x[n * a.x_stride + k];
    }
  }
}

// acc (16 weight rows × 16 rows of x, float32, row stride 16) = the 16 weight rows at w (row
// stride w_bytes) times packed x over `full` blocks, then the 16 × 32 tail block (row stride 64
// bytes) where there is one. Tile 0 the result, 1 the weight, 2 x.
__attribute__((target("amx-tile,amx-bf16"), noinline)) void amx_bf16_group(
    const uint16_t* w, int64_t w_bytes, const uint16_t* packed, int64_t full,
    const uint16_t* tail, float* acc) {
  _tile_zero(0);
  for (int64_t b = 0; b < full; ++b) {
    _tile_loadd(1, w + b * 2 * kAmxPairs, w_bytes);
    _tile_loadd(2, packed + b * kAmxBlockValues, kAmxTileK);
    _tile_dpbf16ps(0, 1, 2);
  }
  if (tail != nullptr) {
    _tile_loadd(1, tail, kAmxTileK);
    _tile_loadd(2, packed + full * kAmxBlockValues, kAmxTileK);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, acc, kAmxTileK);
}

void amx_bf16_linear(const LinearFewRows& a) {
  const int64_t k = a.in_features, pair_k = 2 * kAmxPairs;
  const int64_t full = k / pair_k, blocks = (k + pair_k - 1) / pair_k;
  std::vector<uint16_t> packed(blocks * kAmxBlockValues);
  amx_pack_x_bf16(a, blocks, packed.data());
  const auto* weight = static_cast<const uint16_t*>(a.weight);
  const auto* bias = static_cast<const at::BFloat16*>(a.bias);
  auto* y = static_cast<at::BFloat16*>(a.y);
  const int64_t groups = (a.out_features + kAmxTile - 1) / kAmxTile;
  const int64_t grain = std::max<int64_t>(1, 65536 / (kAmxTile * std::max<int64_t>(k, 1) * 2));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    amx_configure();
    alignas(64) float acc[kAmxTile * kAmxTile];
    std::vector<uint16_t> zeros;  // a copy of the weight rows or k that a tile cannot load
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kAmxTile, n = std::min(kAmxTile, a.out_features - first);
      const uint16_t* w = weight + first * a.weight_stride;
      if (n < kAmxTile) {  // 16 rows of every block, those past n zero
        zeros.assign(kAmxTile * blocks * pair_k, 0);
        for (int64_t i = 0; i < n; ++i) {
          std::copy(w + i * a.weight_stride, w + i * a.weight_stride + k,
                    zeros.data() + i * blocks * pair_k);
        }
        amx_bf16_group(zeros.data(), blocks * pair_k * 2, packed.data(), blocks, nullptr, acc);
      } else if (full < blocks) {  // the last k of the 16 rows as one zero-padded block
        zeros.assign(kAmxTile * pair_k, 0);
        for (int64_t i = 0; i < kAmxTile; ++i) {
          std::copy(w + i * a.weight_stride + full * pair_k, w + i * a.weight_stride + k,
                    zeros.data() + i * pair_k);
        }
        amx_bf16_group(w, a.weight_stride * 2, packed.data(), full, zeros.data(), acc);
      } else {
        amx_bf16_group(w, a.weight_stride * 2, packed.data(), full, nullptr, acc);
      }
      for (int64_t i = 0; i < n; ++i) {
        const float b = bias != nullptr ? static_cast<float>(bias[first + i]) : 0.0f;
        for (int64_t r = 0; r < a.rows; ++r) {
          y[r * a.y_stride + first + i] = static_cast<at::BFloat16>(acc[i * kAmxTile + r] + b);
        }
      }
    }
    amx_release();
  });
}

#endif  // AVX-512

}  // namespace

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
void linear_few_rows(const LinearFewRows& a) {
#if defined(CPU_CAPABILITY_AVX512)
  // one row: the dot products (below) are faster than the tiles (docs/design.md, Decisions)
  if (a.dtype == DType::kBFloat16 && a.rows > 1 && amx_bf16_enabled()) return amx_bf16_linear(a);
  if (a.dtype == DType::kBFloat16 && bf16_dot_enabled()) {
    const int64_t tiles = a.out_features / kTileCols;
    at::parallel_for(0, tiles, column_grain(a, 2), [&](int64_t begin, int64_t end) {
      bf16_dot_columns(a, begin * kTileCols, end * kTileCols);
    });
    bf16_dot_columns(a, tiles * kTileCols, a.out_features);
    return;
  }
#endif
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
    auto columns = [&](auto tile_cols) {
      constexpr int C = decltype(tile_cols)::value;
      const int64_t tiles = a.out_features / C;
      at::parallel_for(0, tiles, column_grain(a, sizeof(T), C), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) few_rows_column<C>(f, t * C);
      });
      for (int64_t col = tiles * C; col < a.out_features; ++col) few_rows_column<1>(f, col);
    };
    if (a.rows == 1) {
      columns(std::integral_constant<int, kOneRowTileCols>{});
    } else {
      columns(std::integral_constant<int, kTileCols>{});
    }
  });
}
#endif

}  // namespace magneto::cpu::MAGNETO_ISA
