// What every CPU kernel (kernels_impl.h) is made of: a row as float32 vectors (loaded from and
// stored to bf16/fp16 through a per-thread buffer), the software prefetch of the rows ahead, and
// the loops over rows, with the fixed row chunks of the deterministic column sums.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Vec's register type, for arrays of accumulators: GCC keeps an array of __m256/__m512 in
// registers, but leaves an array of Vec (a class) in memory, loading and storing every element
// around each FMA (a store-to-load chain per update) whatever the register pressure.
#if defined(CPU_CAPABILITY_AVX512)
using VecReg = __m512;
#elif defined(CPU_CAPABILITY_AVX2)
using VecReg = __m256;
#else
using VecReg = Vec;
#endif

// ------------------------------------------------------------------------------------ helpers

// Calls f(j, count) for consecutive vectors of the row [0, n): count == kW except for the tail.
template <typename F>
inline void vec_loop(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) f(j, kW);
  if (j < n) f(j, n - j);
}

// vec_loop for running sums: f(j, count, lane) with lane in [0, kLanes), consecutive vectors on
// consecutive lanes, so that a sum kept per lane is kLanes independent chains; one chain made the
// add's latency the loop's bound (docs/design.md, Decisions). The tail goes to lane 1. Flattened:
// with four call sites GCC called the body per vector, its sums and captures in memory.
constexpr int kLanes = 4;
template <typename F>
__attribute__((flatten)) inline void vec_loop_lanes(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + kLanes * kW <= n; j += kLanes * kW) {
    f(j, kW, 0);
    f(j + kW, kW, 1);
    f(j + 2 * kW, kW, 2);
    f(j + 3 * kW, kW, 3);
  }
  for (; j + kW <= n; j += kW) f(j, kW, 0);
  if (j < n) f(j, n - j, 1);
}

// Scratch floats for a unit of rows, left uninitialised: the kernels write each element before
// reading it (load_row, dest_row), and for float32 rows never touch it; zero-filling it was a
// memset of up to six row widths per unit (docs/design.md, Decisions).
inline std::unique_ptr<float[]> row_scratch(int64_t count) {
  return std::make_unique_for_overwrite<float[]>(static_cast<size_t>(count));
}

// A row of T seen as floats: the row itself for float, else converted into `scratch`.
template <typename T>
inline const float* load_row(const T* row, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    at::vec::convert(row, scratch, n);
    return scratch;
  }
}

// Where to compute a float row destined for `row`: the row itself for float, else `scratch`
// (then written back by store_row).
template <typename T>
inline float* dest_row(T* row, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    return scratch;
  }
}

template <typename T>
inline void store_row(const float* src, T* row, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) at::vec::convert(src, row, n);
}

// Writes a float row to storage of type T (a copy for float).
template <typename T>
inline void write_row(const float* src, T* row, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, row);
  } else {
    at::vec::convert(src, row, n);
  }
}

// Rounds the lanes of v to T and back (what computing in T does to a result): at::vec's vector
// conversions, round to nearest even as static_cast<T> is (done a lane at a time it was the
// bulk of a bf16 norm pass with a residual or an input activation: docs/design.md, Decisions).
template <typename T>
inline Vec round_vec(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

// Horizontal sum of the vector lanes, in a fixed order.
inline float hsum(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float s = 0.0f;
  for (int64_t l = 0; l < kW; ++l) s += lanes[l];
  return s;
}

// A running sum per lane of vec_loop_lanes, zeroed (in VecReg, see above); sum() adds them up in
// a fixed order.
struct LaneSums {
  static_assert(kLanes == 4, "sum() pairs four lanes");
  VecReg lanes[kLanes] = {Vec(0.0f), Vec(0.0f), Vec(0.0f), Vec(0.0f)};
  void add(int l, const Vec& v) { lanes[l] = Vec(lanes[l]) + v; }
  void fmadd(int l, const Vec& a, const Vec& b) { lanes[l] = at::vec::fmadd(a, b, Vec(lanes[l])); }
  float sum() const {
    return hsum((Vec(lanes[0]) + Vec(lanes[1])) + (Vec(lanes[2]) + Vec(lanes[3])));
  }
};

// The largest lane; NaN if any lane is NaN.
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t l = 1; l < kW; ++l) m = lanes[l] > m || lanes[l] != lanes[l] ? lanes[l] : m;
  return m;
}

inline float hfirst(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  return lanes[0];
}

template <typename F>
inline void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(c10::BFloat16{});
    case DType::kFloat16: return f(c10::Half{});
  }
}


// ----------------------------------------------------------------------- software prefetch

// The row kernels make two or three passes over a row, and only the first comes from memory: the
// hardware prefetcher follows that pass but leaves the memory idle while the others run in L1.
// So one pass also touches, column by column, the same columns `ahead` rows on (about 8 KiB
// ahead, at least a row) of the rows to read and, for writing, of the rows to write, which keeps
// loads and write-allocations in flight behind the arithmetic (docs/design.md, Decisions).
struct RowPrefetch {
  const char* base = nullptr;  // null (also from a null row pointer): nothing to prefetch
  int64_t row_bytes = 0;       // stride between rows, in bytes
  int64_t rows = 0;
  int64_t ahead = 1;
  size_t elem = 4;

  RowPrefetch() = default;
  template <typename T>
  RowPrefetch(const T* base_, int64_t stride, int64_t rows_, int64_t cols)
      : base(reinterpret_cast<const char*>(base_)),
        row_bytes(stride * static_cast<int64_t>(sizeof(T))),
        rows(rows_),
        ahead(std::clamp<int64_t>(
            8192 / std::max<int64_t>(1, cols * static_cast<int64_t>(sizeof(T))), 1, 8)),
        elem(sizeof(T)) {}

  // The row `ahead` rows after row i, or null past the last row.
  const char* after(int64_t i) const {
    return base != nullptr && i + ahead < rows ? base + (i + ahead) * row_bytes : nullptr;
  }
  // Prefetches column j of a row from after(), to be read or to be written.
  void touch(const char* row, int64_t j) const {
    if (row != nullptr) __builtin_prefetch(row + j * static_cast<int64_t>(elem), 0, 3);
  }
  void touch_for_write(const char* row, int64_t j) const {
    if (row != nullptr) __builtin_prefetch(row + j * static_cast<int64_t>(elem), 1, 3);
  }
};

// ------------------------------------------------------------------- deterministic reductions

// Fixed row chunks for column sums: the count depends only on the shape, never on the number of
// threads; at least 32 rows a chunk (each chunk's partial rows are read and written once per row,
// so fewer, longer chunks keep them in cache; docs/design.md, Decisions), at most 128 chunks,
// and the partial sums stay below 4M floats.
inline int64_t reduction_chunks(int64_t rows, int64_t cols) {
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(cols, 1));
  return std::max<int64_t>(1, std::min({rows / 32, int64_t{128}, by_memory}));
}

// Runs body(row_begin, row_end, chunk) over the rows: in the fixed chunks when a column reduction
// is wanted (chunks > 0), else in up to 64 blocks of at least ~16K elements (chunk = -1). The
// threads take the units one at a time, so that one slowed down (by another process on a shared
// machine) does not hold the others at the barrier (docs/design.md, Decisions); which thread
// runs a chunk never changes its partial sums.
template <typename F>
inline void for_rows(int64_t rows, int64_t cols, int64_t chunks, F&& body) {
  const bool reduce = chunks > 0;
  int64_t units = chunks;
  if (!reduce) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
    units = std::max<int64_t>(1, std::min<int64_t>((rows + grain - 1) / grain, 64));
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t unit = next.fetch_add(1); unit < units; unit = next.fetch_add(1)) {
      body(unit * rows / units, (unit + 1) * rows / units, reduce ? unit : int64_t{-1});
    }
  });
}

// out[j] = Σ_c partial[c·cols + j], summed in chunk order.
inline void sum_chunks(const float* partial, int64_t chunks, int64_t cols, float* out) {
  at::parallel_for(0, cols, 1024, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) out[j] = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = partial + c * cols;
      for (int64_t j = jb; j < je; ++j) out[j] += p[j];
    }
  });
}

}  // namespace

}  // namespace magneto::cpu::MAGNETO_ISA
