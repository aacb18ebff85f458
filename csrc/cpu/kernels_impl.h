// Implementation of the CPU kernels of kernels.h, compiled once per instruction set: each
// kernels_<isa>.cpp defines MAGNETO_ISA (the namespace the functions land in) and the
// CPU_CAPABILITY macros that select at::vec's implementation, then includes this file.
//
// Every kernel works on float32 copies of one row at a time (a row of bf16/fp16 is converted into
// a per-thread buffer of `cols` floats, which stays in L1/L2), so the arithmetic is written once,
// over Vectorized<float>. Parallelism is over rows; column reductions (dgamma, dbeta, dbias) use
// fixed row chunks whose partial sums are added in a fixed order, so results do not depend on the
// number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"
#include "cpu/kernels.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// ------------------------------------------------------------------------------------ helpers

// Calls f(j, count) for consecutive vectors of the row [0, n): count == kW except for the tail.
template <typename F>
inline void vec_loop(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) f(j, kW);
  if (j < n) f(j, n - j);
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

// Rounds the lanes of v to T and back (what computing in T does to a result).
template <typename T>
inline Vec round_vec(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    alignas(64) float lanes[kW];
    v.store(lanes);
    for (int64_t l = 0; l < kW; ++l) lanes[l] = static_cast<float>(static_cast<T>(lanes[l]));
    return Vec::loadu(lanes);
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

inline float hfirst(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  return lanes[0];
}

// ------------------------------------------------------------------------------ activations

constexpr float kSqrtHalf = 0.70710678118654752440f;     // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1/sqrt(2 pi)
constexpr float kTanhBeta = 0.79788456080286535588f;     // sqrt(2/pi)
constexpr float kTanhKappa = 0.044715f;
constexpr float kLog2e = 1.44269504088896340736f;

// 2^t for t <= 0, as 2^n·2^f with n = round(t): 2^f, |f| <= 1/2, by a degree-6 minimax
// polynomial (relative error 9.6e-8 in float arithmetic, about 1 ulp) and 2^n written
// straight into the exponent bits. t is clamped at -126, so the result bottoms out at 2^-126
// (~1.2e-38) instead of underflowing; its one use below cannot tell the difference.
// 13 vector instructions against ~19 for at::vec's exp_u20 (fc2-shaped ln_linear forward: −7%).
inline Vec exp2_nonpositive(const Vec& t) {
  const Vec clamped = at::vec::maximum(t, Vec(-126.0f));
  const Vec n = clamped.round();
  const Vec f = clamped - n;
  Vec p = at::vec::fmadd(Vec(0.00015345810970757157f), f, Vec(0.0013399930903688073f));
  p = at::vec::fmadd(p, f, Vec(0.009618489071726799f));
  p = at::vec::fmadd(p, f, Vec(0.05550328642129898f));
  p = at::vec::fmadd(p, f, Vec(0.24022646248340607f));
  p = at::vec::fmadd(p, f, Vec(0.6931471824645996f));
  p = at::vec::fmadd(p, f, Vec(1.0f));
  // (n + 127)·2^23, exact in float for n in [-126, 0], is the bit pattern of 2^n.
  const Vec pow2_bits = at::vec::fmadd(n, Vec(8388608.0f), Vec(1065353216.0f));
  return p * at::vec::cast<float>(at::vec::convert_to_int_of_same_size(pow2_bits));
}

// The normal CDF Φ(x) and density φ(x) that GELU and its derivative are made of, sharing one
// exp(−x²/2): the tail Φ(−|x|) = erfc(|x|/√2)/2 by Abramowitz–Stegun 7.1.26 (|error| ≤ 7.5e-8;
// the formula at::vec's erf uses, which spends a second exp when φ is wanted too), and
// Φ(x) = 1 − Φ(−|x|) for x >= 0. tests/test_ops_cpu.py::test_gelu_accuracy derives the error
// bound of GELU and its derivative from these steps and checks it on every instruction set.
inline void gelu_cdf_pdf(const Vec& x, Vec& cdf, Vec& pdf) {
  const Vec t = Vec(1.0f) / at::vec::fmadd(Vec(0.3275911f * kSqrtHalf), x.abs(), Vec(1.0f));
  // The 7.1.26 coefficients halved (exactly), so that r·t·e is the tail itself.
  Vec r = at::vec::fmadd(Vec(0.5f * 1.061405429f), t, Vec(0.5f * -1.453152027f));
  r = at::vec::fmadd(r, t, Vec(0.5f * 1.421413741f));
  r = at::vec::fmadd(r, t, Vec(0.5f * -0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.5f * 0.254829592f));
  const Vec e = exp2_nonpositive(x * x * Vec(-0.5f * kLog2e));  // exp(−x²/2)
  const Vec tail = r * t * e;                                      // Φ(−|x|)
  cdf = Vec::blendv(Vec(1.0f) - tail, tail, x < Vec(0.0f));
  pdf = e * Vec(kInvSqrt2Pi);
}

template <Activation A>
inline Vec act_forward(const Vec& x) {
  if constexpr (A == Activation::kNone) {
    return x;
  } else if constexpr (A == Activation::kRelu) {
    return at::vec::clamp_min(x, Vec(0.0f));
  } else if constexpr (A == Activation::kGelu) {
    Vec cdf, pdf;
    gelu_cdf_pdf(x, cdf, pdf);
    return x * cdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    const Vec inner = Vec(kTanhBeta) * (x + Vec(kTanhKappa) * x * x * x);
    return Vec(0.5f) * x * (Vec(1.0f) + inner.tanh());
  } else if constexpr (A == Activation::kRelu2) {
    const Vec r = at::vec::clamp_min(x, Vec(0.0f));
    return r * r;
  } else {  // silu: x·sigmoid(x)
    return x / (Vec(1.0f) + x.neg().exp());
  }
}

// d act(x) / dx.
template <Activation A>
inline Vec act_derivative(const Vec& x) {
  if constexpr (A == Activation::kNone) {
    return Vec(1.0f);
  } else if constexpr (A == Activation::kRelu) {
    return Vec::blendv(Vec(0.0f), Vec(1.0f), x > Vec(0.0f));
  } else if constexpr (A == Activation::kGelu) {
    Vec cdf, pdf;
    gelu_cdf_pdf(x, cdf, pdf);
    return at::vec::fmadd(x, pdf, cdf);  // Φ(x) + x·φ(x)
  } else if constexpr (A == Activation::kGeluTanh) {
    const Vec x2 = x * x;
    const Vec t = (Vec(kTanhBeta) * (x + Vec(kTanhKappa) * x2 * x)).tanh();
    const Vec dinner = Vec(kTanhBeta) * (Vec(1.0f) + Vec(3.0f * kTanhKappa) * x2);
    return Vec(0.5f) * (Vec(1.0f) + t) + Vec(0.5f) * x * (Vec(1.0f) - t * t) * dinner;
  } else if constexpr (A == Activation::kRelu2) {
    return Vec(2.0f) * at::vec::clamp_min(x, Vec(0.0f));
  } else {  // silu: s·(1 + x·(1 − s))
    const Vec s = Vec(1.0f) / (Vec(1.0f) + x.neg().exp());
    return s * (Vec(1.0f) + x * (Vec(1.0f) - s));
  }
}

// act(x) and act'(x) together, sharing their transcendental terms.
template <Activation A>
inline void act_with_derivative(const Vec& x, Vec& value, Vec& derivative) {
  if constexpr (A == Activation::kGelu) {
    Vec cdf, pdf;
    gelu_cdf_pdf(x, cdf, pdf);
    value = x * cdf;
    derivative = at::vec::fmadd(x, pdf, cdf);
  } else if constexpr (A == Activation::kSilu) {
    const Vec s = Vec(1.0f) / (Vec(1.0f) + x.neg().exp());
    value = x * s;
    derivative = s * (Vec(1.0f) + x * (Vec(1.0f) - s));
  } else if constexpr (A == Activation::kRelu2) {
    const Vec r = at::vec::clamp_min(x, Vec(0.0f));
    value = r * r;
    derivative = r + r;
  } else {
    value = act_forward<A>(x);
    derivative = act_derivative<A>(x);
  }
}

// Calls f(std::integral_constant<Activation, a>{}) so the activation is a compile-time constant
// inside the loops.
template <typename F>
inline void with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kNone: return f(std::integral_constant<Activation, Activation::kNone>{});
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSilu: return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kRelu2: return f(std::integral_constant<Activation, Activation::kRelu2>{});
    default: return;  // a gated code: see with_input_activation
  }
}

// Calls f(ia, gated) for an input activation: ia the activation (a gated one's gate), gated
// std::true_type for a gated one (common.h's kGatedActivations: only their gates are compiled
// into the gated kernels), std::false_type else.
template <typename F>
inline void with_input_activation(Activation a, F&& f) {
  if (!is_gated(a)) return with_activation(a, [&](auto ia) { f(ia, std::false_type{}); });
  switch (gate_of(a)) {
    case Activation::kGelu:
      return f(std::integral_constant<Activation, Activation::kGelu>{}, std::true_type{});
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{}, std::true_type{});
    case Activation::kRelu2:
      return f(std::integral_constant<Activation, Activation::kRelu2>{}, std::true_type{});
    default: return;  // csrc/checks.cpp admits no other gate
  }
}

template <typename F>
inline void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(c10::BFloat16{});
    case DType::kFloat16: return f(c10::Half{});
  }
}

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

// ----------------------------------------------------------------------- software prefetch

// The row kernels make two or three passes over a row, and only the first comes from memory: the
// hardware prefetcher follows that pass but leaves the memory idle while the others run in L1.
// So one pass also touches, column by column, the same columns `ahead` rows on (about 8 KiB
// ahead, at least a row) of the rows to read and, for writing, of the rows to write, which keeps
// loads and write-allocations in flight behind the arithmetic. Measured in fp32 against no
// software prefetch, one thread / two: 1024×3072 forward with GELU writing H −36% / −30%, its
// backward −25% / −13%; LayerNorm 8192×1024 forward −24% / −10%, backward −29% / −15%.
struct RowPrefetch {
  const char* base = nullptr;  // null: nothing to prefetch
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
// so fewer, longer chunks keep them in cache: 1024×3072 LayerNorm backward 1.85 -> 1.72 ms
// against 8-row chunks), at most 128 chunks, and the partial sums stay below 4M floats.
inline int64_t reduction_chunks(int64_t rows, int64_t cols) {
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(cols, 1));
  return std::max<int64_t>(1, std::min({rows / 32, int64_t{128}, by_memory}));
}

// Runs body(row_begin, row_end, chunk) over the rows: in the fixed chunks when a column reduction
// is wanted (chunks > 0), else in up to 64 blocks of at least ~16K elements (chunk = -1). The
// threads take the units one at a time, so that one slowed down (by another process on a shared
// machine) does not hold the others at the barrier (2 threads: 1024×3072 backward −2..6%); which
// thread runs a chunk never changes its partial sums.
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

// ------------------------------------------------------------------------------ norm forward

// Mean and 1/std (or 1/rms) of a float row. The mean is taken as shift + Σ(v − shift)/n with
// shift = v[0]: the shifted terms are of the size of the row's spread, not of its mean, so the
// sum loses no digits when |mean| >> std and the mean is exact to its own rounding (a plain Σ v
// in fp32 lanes was 2-3.7x PyTorch's error at |mean|/std = 1e3). `shifted_sum` is Σ(v − v[0])
// when the caller has it (NaN: not known).
inline void row_stats(Norm norm, const float* v, int64_t n, float eps, float shifted_sum,
                      float& mean, float& rstd) {
  mean = 0.0f;
  rstd = 1.0f;
  if (norm == Norm::kNone) return;
  const float inv_n = 1.0f / static_cast<float>(n);
  if (norm == Norm::kLayer) {
    const Vec shift(v[0]);
    if (std::isnan(shifted_sum)) {
      Vec acc(0.0f);
      vec_loop(n, [&](int64_t j, int64_t c) {
        acc += Vec::set(Vec(0.0f), Vec::loadu(v + j, c) - shift, c);
      });
      shifted_sum = hsum(acc);
    }
    mean = v[0] + shifted_sum * inv_n;
  }
  // Second pass over the cached row: sum of squared deviations (no cancellation).
  const Vec m(mean);
  Vec acc(0.0f);
  vec_loop(n, [&](int64_t j, int64_t c) {
    const Vec d = Vec::set(Vec(0.0f), Vec::loadu(v + j, c) - m, c);
    acc = at::vec::fmadd(d, d, acc);
  });
  rstd = 1.0f / std::sqrt(std::max(hsum(acc) * inv_n, 0.0f) + eps);
}

// Gated (IA then the gate's activation, never kNone): a row of x is [gate | up], 2n wide, and
// a = IA(gate)·up (kernels.h).
template <typename T, Activation IA, bool Gated>
void norm_forward_typed(const NormForward& a) {
  const int64_t n = a.cols;
  const int64_t x_cols = Gated ? 2 * n : n;
  const RowPrefetch x_ahead(static_cast<const T*>(a.x), a.x_stride, a.rows, x_cols);
  const RowPrefetch residual_ahead = a.residual == nullptr
      ? RowPrefetch()
      : RowPrefetch(static_cast<const T*>(a.residual), a.residual_stride, a.rows, n);
  const RowPrefetch y_ahead(static_cast<const T*>(a.y), a.y_stride, a.rows, n);
  const RowPrefetch sum_ahead = a.sum == nullptr
      ? RowPrefetch()
      : RowPrefetch(static_cast<const T*>(a.sum), a.sum_stride, a.rows, n);
  for_rows(a.rows, n, 0, [&](int64_t rb, int64_t re, int64_t) {
    std::vector<float> buffer(x_cols + 2 * n);
    float* v_buf = buffer.data();
    float* y_buf = v_buf + x_cols;
    float* r_buf = y_buf + n;
    const Vec alpha(a.alpha);
    // The rows ahead are touched in the first sweep when there is one (the long one, with the
    // activation: 1024×3072 with GELU −19% / −13% against touching them in the normalising
    // pass), else in the normalising pass. The touches are written out in each loop on purpose:
    // behind a helper lambda GCC kept the pointers in memory and the forward ran 40-55% slower.
    const bool first_sweep = a.residual != nullptr || IA != Activation::kNone;
    for (int64_t i = rb; i < re; ++i) {
      const char* next_x = x_ahead.after(i);
      const char* next_residual = residual_ahead.after(i);
      const char* next_y = y_ahead.after(i);
      const char* next_sum = sum_ahead.after(i);
      const float* xf = load_row(static_cast<const T*>(a.x) + i * a.x_stride, v_buf, x_cols);
      const float* v = xf;
      float shifted_sum = NAN;
      if (first_sweep) {
        // One sweep: s = x + alpha·residual (to `sum` when wanted), a = in_act(s) rounded to T
        // into v_buf (which may hold x already: element j, and gated its up element n + j, is
        // read before element j is written), and Σ(a − a[0]) for row_stats.
        const float* r = a.residual == nullptr
            ? nullptr
            : load_row(static_cast<const T*>(a.residual) + i * a.residual_stride, r_buf, n);
        float* s_out = a.sum != nullptr ? y_buf : nullptr;
        // row_stats' shift: a[0], the first element as the loop below computes it.
        Vec first(xf[0]);
        if (r != nullptr) first = at::vec::fmadd(alpha, Vec(r[0]), first);
        if constexpr (IA != Activation::kNone) {
          first = act_forward<IA>(first);
          if constexpr (Gated) first = first * Vec(xf[n]);
          first = round_vec<T>(first);
        }
        const Vec shift(hfirst(first));
        Vec acc(0.0f);
        vec_loop(n, [&](int64_t j, int64_t c) {
          x_ahead.touch(next_x, j);
          if constexpr (Gated) x_ahead.touch(next_x, n + j);
          residual_ahead.touch(next_residual, j);
          y_ahead.touch_for_write(next_y, j);
          sum_ahead.touch_for_write(next_sum, j);
          Vec sv = Vec::loadu(xf + j, c);
          if (r != nullptr) sv = at::vec::fmadd(alpha, Vec::loadu(r + j, c), sv);
          if (s_out != nullptr) sv.store(s_out + j, c);
          Vec av = sv;
          if constexpr (IA != Activation::kNone) {
            av = act_forward<IA>(sv);
            if constexpr (Gated) av = av * Vec::loadu(xf + n + j, c);
            av = round_vec<T>(av);
          }
          av.store(v_buf + j, c);
          acc += Vec::set(Vec(0.0f), av - shift, c);
        });
        if (s_out != nullptr) write_row(s_out, static_cast<T*>(a.sum) + i * a.sum_stride, n);
        shifted_sum = hsum(acc);
        v = v_buf;
      }
      float mean, rstd;
      row_stats(a.norm, v, n, a.eps, shifted_sum, mean, rstd);
      if (a.mean != nullptr && a.norm == Norm::kLayer) a.mean[i] = mean;
      if (a.rstd != nullptr && a.norm != Norm::kNone) a.rstd[i] = rstd;

      T* y_row = static_cast<T*>(a.y) + i * a.y_stride;
      float* y = dest_row(y_row, y_buf);
      if (a.norm == Norm::kNone) {
        std::copy(v, v + n, y);
      } else {
        const Vec m(mean), r(rstd);
        if (first_sweep) next_x = next_residual = next_y = next_sum = nullptr;  // touched
        vec_loop(n, [&](int64_t j, int64_t c) {
          x_ahead.touch(next_x, j);
          residual_ahead.touch(next_residual, j);
          y_ahead.touch_for_write(next_y, j);
          sum_ahead.touch_for_write(next_sum, j);
          Vec out = (Vec::loadu(v + j, c) - m) * r;
          if (a.gamma != nullptr) out = out * Vec::loadu(a.gamma + j, c);
          if (a.beta != nullptr) out = out + Vec::loadu(a.beta + j, c);
          out.store(y + j, c);
        });
      }
      store_row(y, y_row, n);
    }
  });
}

// ----------------------------------------------------------------------------- norm backward

// Gated as for norm_forward_typed: x and dx rows are 2n wide.
template <typename T, Activation IA, bool Gated>
void norm_backward_typed(const NormBackward& a) {
  const int64_t n = a.cols;
  const int64_t x_cols = Gated ? 2 * n : n;
  const bool reduce = a.dy != nullptr && (a.dgamma != nullptr || a.dbeta != nullptr);
  const int64_t chunks = reduce ? reduction_chunks(a.rows, n) : 0;
  std::vector<float> dgamma_part(a.dgamma != nullptr ? chunks * n : 0, 0.0f);
  std::vector<float> dbeta_part(a.dbeta != nullptr ? chunks * n : 0, 0.0f);
  const bool layer = a.norm == Norm::kLayer;
  const bool none = a.norm == Norm::kNone;
  const bool want_dx = a.dy != nullptr && a.dx != nullptr;
  const RowPrefetch x_ahead(static_cast<const T*>(a.x), a.x_stride, a.rows, x_cols);
  const RowPrefetch dy_ahead = a.dy == nullptr
      ? RowPrefetch()
      : RowPrefetch(static_cast<const T*>(a.dy), a.dy_stride, a.rows, n);
  const RowPrefetch h_ahead = a.h == nullptr
      ? RowPrefetch()
      : RowPrefetch(static_cast<const T*>(a.h), a.h_stride, a.rows, n);
  // dx written in place of dy is in cache already.
  const RowPrefetch dx_ahead = !want_dx || a.dx == a.dy
      ? RowPrefetch()
      : RowPrefetch(static_cast<const T*>(a.dx), a.dx_stride, a.rows, x_cols);

  for_rows(a.rows, n, chunks, [&](int64_t rb, int64_t re, int64_t chunk) {
    std::vector<float> buffer(2 * x_cols + (Gated ? 5 : 4) * n);
    float* x_buf = buffer.data();     // x as floats (the input activation's argument)
    float* xh_buf = x_buf + x_cols;   // xhat (with an input activation)
    float* da_buf = xh_buf + n;       // in_act'(x); gated ∂a/∂gate = up·IA'(gate)
    float* dy_buf = da_buf + n;
    float* out_buf = dy_buf + n;      // dx or h before conversion
    float* acc_buf = out_buf + x_cols;  // grad_accum
    float* act_buf = acc_buf + n;     // gated: ∂a/∂up = IA(gate)
    float* pg = a.dgamma != nullptr && chunk >= 0 ? dgamma_part.data() + chunk * n : nullptr;
    float* pb = a.dbeta != nullptr && chunk >= 0 ? dbeta_part.data() + chunk * n : nullptr;
    const bool affine = !none && a.gamma != nullptr;
    const bool shift = !none && a.beta != nullptr;
    // Sweep 2 reads xhat back when it came from the activation; else recomputing it from the
    // cached row of x is cheaper than a store and a load.
    const bool keep_xhat = want_dx && IA != Activation::kNone;

    for (int64_t i = rb; i < re; ++i) {
      const float* xf = load_row(static_cast<const T*>(a.x) + i * a.x_stride, x_buf, x_cols);
      const float* dy = a.dy == nullptr
          ? nullptr
          : load_row(static_cast<const T*>(a.dy) + i * a.dy_stride, dy_buf, n);
      T* h_row = a.h == nullptr ? nullptr : static_cast<T*>(a.h) + i * a.h_stride;
      float* h = h_row == nullptr ? nullptr : dest_row(h_row, out_buf);
      const Vec m(layer ? a.mean[i] : 0.0f), r(none ? 1.0f : a.rstd[i]);

      // Sweep 1, one read of x (and dy): a = in_act(x) rounded to T, in_act'(x) (kept for dx),
      // xhat (kept for dx), h, the dgamma/dbeta partial sums and the row sums of g = dy⊙gamma
      // and g⊙xhat.
      // (Compiled once per combination of h and dy present, so the loop carries no such test.)
      // It is the longer sweep, so it also touches the rows ahead, to read and to write (2
      // threads, 1024×3072 with GELU: −4% against the writes touched in sweep 2).
      Vec sum_g(0.0f), sum_gxhat(0.0f);
      const char* next_x = x_ahead.after(i);
      const char* next_dy = dy_ahead.after(i);
      const char* next_h = h_ahead.after(i);
      const char* next_dx = dx_ahead.after(i);
      auto sweep1 = [&](auto with_h, auto with_dy) {
        vec_loop(n, [&](int64_t j, int64_t c) {
          x_ahead.touch(next_x, j);
          dy_ahead.touch(next_dy, j);
          h_ahead.touch_for_write(next_h, j);
          dx_ahead.touch_for_write(next_dx, j);
          if constexpr (Gated) {
            x_ahead.touch(next_x, n + j);
            dx_ahead.touch_for_write(next_dx, n + j);
          }
          Vec av = Vec::loadu(xf + j, c);
          if constexpr (IA != Activation::kNone) {
            if (want_dx) {
              const Vec xv = av;
              Vec derivative;
              act_with_derivative<IA>(xv, av, derivative);
              if constexpr (Gated) {
                const Vec up = Vec::loadu(xf + n + j, c);
                (up * derivative).store(da_buf + j, c);
                av.store(act_buf + j, c);
                av = av * up;
              } else {
                derivative.store(da_buf + j, c);
              }
            } else {
              av = act_forward<IA>(av);
              if constexpr (Gated) av = av * Vec::loadu(xf + n + j, c);
            }
            av = round_vec<T>(av);
          }
          const Vec xh = Vec::set(Vec(0.0f), (av - m) * r, c);  // exact for Norm::kNone (m 0, r 1)
          if (keep_xhat) xh.store(xh_buf + j, c);
          if constexpr (decltype(with_h)::value) {
            Vec out = affine ? xh * Vec::loadu(a.gamma + j, c) : xh;
            if (shift) out = out + Vec::loadu(a.beta + j, c);
            out.store(h + j, c);
          }
          if constexpr (decltype(with_dy)::value) {
            const Vec d = Vec::loadu(dy + j, c);
            if (pg != nullptr) at::vec::fmadd(d, xh, Vec::loadu(pg + j, c)).store(pg + j, c);
            if (pb != nullptr) (d + Vec::loadu(pb + j, c)).store(pb + j, c);
            const Vec g = affine ? d * Vec::loadu(a.gamma + j, c) : d;
            sum_g += g;
            sum_gxhat = at::vec::fmadd(g, xh, sum_gxhat);
          }
        });
      };
      using Yes = std::true_type;
      using No = std::false_type;
      if (h != nullptr) {
        if (dy != nullptr) sweep1(Yes{}, Yes{}); else sweep1(Yes{}, No{});
      } else if (dy != nullptr) {
        sweep1(No{}, Yes{});
      }
      if (h != nullptr) store_row(h, h_row, n);
      if (!want_dx) continue;

      const float inv_n = 1.0f / static_cast<float>(n);
      const Vec mean_g(layer ? hsum(sum_g) * inv_n : 0.0f);
      const Vec mean_gxhat(none ? 0.0f : hsum(sum_gxhat) * inv_n);
      const float* acc = a.grad_accum == nullptr
          ? nullptr
          : load_row(static_cast<const T*>(a.grad_accum) + i * a.grad_accum_stride, acc_buf, n);
      T* dx_row = static_cast<T*>(a.dx) + i * a.dx_stride;
      float* dx = dest_row(dx_row, out_buf);
      // Sweep 2: dx = rstd·(g − mean_g − xhat·mean_gxhat)·in_act'(x) + grad_accum (dx may be dy
      // itself: each element of dy is read before it is overwritten); gated, da =
      // rstd·(g − mean_g − xhat·mean_gxhat) and dx = [da·up·IA'(gate) | da·IA(gate)].
      vec_loop(n, [&](int64_t j, int64_t c) {
        const Vec d = Vec::loadu(dy + j, c);
        Vec da;
        if (none) {
          da = d;
        } else {
          const Vec g = affine ? d * Vec::loadu(a.gamma + j, c) : d;
          const Vec xh = keep_xhat ? Vec::loadu(xh_buf + j, c) : (Vec::loadu(xf + j, c) - m) * r;
          da = r * (g - mean_g - xh * mean_gxhat);
        }
        if constexpr (Gated) (da * Vec::loadu(act_buf + j, c)).store(dx + n + j, c);
        if constexpr (IA != Activation::kNone) da = da * Vec::loadu(da_buf + j, c);
        if (acc != nullptr) da = da + Vec::loadu(acc + j, c);
        da.store(dx + j, c);
      });
      store_row(dx, dx_row, x_cols);
    }
  });
  if (a.dgamma != nullptr) {
    if (reduce) {
      sum_chunks(dgamma_part.data(), chunks, n, a.dgamma);
    } else {
      std::fill(a.dgamma, a.dgamma + n, 0.0f);
    }
  }
  if (a.dbeta != nullptr) {
    if (reduce) {
      sum_chunks(dbeta_part.data(), chunks, n, a.dbeta);
    } else {
      std::fill(a.dbeta, a.dbeta + n, 0.0f);
    }
  }
}

// --------------------------------------------------------------------------- linear epilogues

template <typename T, Activation A>
void linear_epilogue_typed(const LinearEpilogue& a) {
  const int64_t n = a.cols;
  const bool drop = a.dropout_p > 0.0;
  const Dropout dropout(a.seed, a.dropout_p);
  for_rows(a.rows, n, 0, [&](int64_t rb, int64_t re, int64_t) {
    std::vector<float> buffer(3 * n);
    float* preact_buf = buffer.data();
    float* r_buf = preact_buf + n;
    float* o_buf = r_buf + n;
    const Vec alpha(a.alpha);
    for (int64_t i = rb; i < re; ++i) {
      const float* preact =
          load_row(static_cast<const T*>(a.preact) + i * a.preact_stride, preact_buf, n);
      const float* res = a.residual == nullptr
          ? nullptr
          : load_row(static_cast<const T*>(a.residual) + i * a.residual_stride, r_buf, n);
      T* out_row = static_cast<T*>(a.out) + i * a.out_stride;
      float* out = dest_row(out_row, o_buf);
      const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(n);
      vec_loop(n, [&](int64_t j, int64_t c) {
        Vec y = act_forward<A>(Vec::loadu(preact + j, c));
        if (drop) y = y * dropout.factors(base + j, c);
        if (res != nullptr) y = at::vec::fmadd(alpha, Vec::loadu(res + j, c), y);
        y.store(out + j, c);
      });
      store_row(out, out_row, n);
    }
  });
}

template <typename T, Activation A>
void linear_epilogue_backward_typed(const LinearEpilogueBackward& a) {
  const int64_t n = a.cols;
  const bool drop = a.dropout_p > 0.0;
  const Dropout dropout(a.seed, a.dropout_p);
  const int64_t chunks = a.dbias != nullptr ? reduction_chunks(a.rows, n) : 0;
  std::vector<float> partial(chunks * n, 0.0f);
  for_rows(a.rows, n, chunks, [&](int64_t rb, int64_t re, int64_t chunk) {
    std::vector<float> buffer(3 * n);
    float* dy_buf = buffer.data();
    float* preact_buf = dy_buf + n;
    float* dz_buf = preact_buf + n;
    float* part = chunk >= 0 ? partial.data() + chunk * n : nullptr;
    for (int64_t i = rb; i < re; ++i) {
      const float* dy = load_row(static_cast<const T*>(a.dy) + i * a.dy_stride, dy_buf, n);
      const float* preact = A == Activation::kNone
          ? nullptr
          : load_row(static_cast<const T*>(a.preact) + i * a.preact_stride, preact_buf, n);
      T* dz_row = a.dz == nullptr ? nullptr : static_cast<T*>(a.dz) + i * a.dz_stride;
      float* dz = dz_row == nullptr ? nullptr : dest_row(dz_row, dz_buf);
      const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(n);
      vec_loop(n, [&](int64_t j, int64_t c) {
        Vec g = Vec::loadu(dy + j, c);
        if (drop) g = g * dropout.factors(base + j, c);
        if constexpr (A != Activation::kNone) g = g * act_derivative<A>(Vec::loadu(preact + j, c));
        if (dz != nullptr) g.store(dz + j, c);
        if (part != nullptr) (Vec::loadu(part + j, c) + g).store(part + j, c);
      });
      if (dz != nullptr) store_row(dz, dz_row, n);
    }
  });
  if (a.dbias != nullptr) sum_chunks(partial.data(), chunks, n, a.dbias);
}

template <typename T>
void residual_bias_init_typed(int64_t rows, int64_t cols, const T* residual,
                              int64_t residual_stride, float alpha, const T* bias, T* out,
                              int64_t out_stride) {
  std::vector<float> bias_f(cols, 0.0f);
  if (bias != nullptr) at::vec::convert(bias, bias_f.data(), cols);
  for_rows(rows, cols, 0, [&](int64_t rb, int64_t re, int64_t) {
    std::vector<float> buffer(2 * cols);
    float* r_buf = buffer.data();
    float* o_buf = r_buf + cols;
    const Vec a(alpha);
    for (int64_t i = rb; i < re; ++i) {
      T* out_row = out + i * out_stride;
      float* o = dest_row(out_row, o_buf);
      if (residual == nullptr) {
        std::copy(bias_f.begin(), bias_f.end(), o);
      } else {
        const float* r = load_row(residual + i * residual_stride, r_buf, cols);
        vec_loop(cols, [&](int64_t j, int64_t c) {
          at::vec::fmadd(a, Vec::loadu(r + j, c), Vec::loadu(bias_f.data() + j, c)).store(o + j, c);
        });
      }
      store_row(o, out_row, cols);
    }
  });
}

// --------------------------------------------------------------------------- few-row linear

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)

// The tile of y that one pass over k computes: up to kTileRows rows of x against kTileCols rows
// of the weight, one vector accumulator each. Each weight row is streamed once per kTileRows rows
// of x: 8×2 fills 16 of AVX-512's 32 registers; AVX2 (16 registers) takes 4×2, which leaves
// room for the operands. (4×4 on AVX-512 measured 1.2x slower at 8 rows: it streams the weight
// twice.)
constexpr int kTileRows = kW >= 16 ? 8 : 4;
constexpr int kTileCols = 2;

// Keeps v in a register: GCC otherwise folds the load of an x vector into each of the C FMAs
// that use it, loading it C times, which makes the loop load-bound (AVX-512, 8 rows, weight in
// L2: 60 -> 98 GFLOP/s).
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

// ------------------------------------------------------------------------- entry points (ISA)

void norm_forward(const NormForward& a) {
  with_dtype(a.dtype, [&](auto t) {
    with_input_activation(a.input_activation, [&](auto ia, auto gated) {
      norm_forward_typed<decltype(t), decltype(ia)::value, decltype(gated)::value>(a);
    });
  });
}

void norm_backward(const NormBackward& a) {
  with_dtype(a.dtype, [&](auto t) {
    with_input_activation(a.input_activation, [&](auto ia, auto gated) {
      norm_backward_typed<decltype(t), decltype(ia)::value, decltype(gated)::value>(a);
    });
  });
}

void linear_epilogue(const LinearEpilogue& a) {
  with_dtype(a.dtype, [&](auto t) {
    with_activation(a.activation, [&](auto act) {
      linear_epilogue_typed<decltype(t), decltype(act)::value>(a);
    });
  });
}

void linear_epilogue_backward(const LinearEpilogueBackward& a) {
  with_dtype(a.dtype, [&](auto t) {
    with_activation(a.activation, [&](auto act) {
      linear_epilogue_backward_typed<decltype(t), decltype(act)::value>(a);
    });
  });
}

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

void residual_bias_init(DType dtype, int64_t rows, int64_t cols, const void* residual,
                        int64_t residual_stride, float alpha, const void* bias, void* out,
                        int64_t out_stride) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    residual_bias_init_typed<T>(rows, cols, static_cast<const T*>(residual), residual_stride,
                                alpha, static_cast<const T*>(bias), static_cast<T*>(out),
                                out_stride);
  });
}

}  // namespace magneto::cpu::MAGNETO_ISA
