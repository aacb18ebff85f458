// The norm forward (kernels.h, NormForward): layer_norm, add_layer_norm and ln_linear's
// prologue, a row at a time.
#pragma once

#include <cmath>

#include "cpu/activations.h"
#include "cpu/kernels.h"
#include "cpu/rows.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

// ------------------------------------------------------------------------------ norm forward

// Mean and 1/std (or 1/rms) of a float row. The mean is taken as shift + Σ(v − shift)/n with
// shift = v[0]: the shifted terms are of the size of the row's spread, not of its mean, so the
// sum loses no digits when |mean| >> std and the mean is exact to its own rounding (a plain Σ v
// in fp32 lanes is not: docs/design.md, Decisions). `shifted_sum` is Σ(v − v[0]) when the
// caller has it (NaN: not known).
inline void row_stats(Norm norm, const float* v, int64_t n, float eps, float shifted_sum,
                      float& mean, float& rstd, float* m2 = nullptr) {
  mean = 0.0f;
  rstd = 1.0f;
  if (norm == Norm::kNone) return;
  const float inv_n = 1.0f / static_cast<float>(n);
  if (norm == Norm::kLayer) {
    const Vec shift(v[0]);
    if (std::isnan(shifted_sum)) {
      LaneSums acc;
      vec_loop_lanes(n, [&](int64_t j, int64_t c, int l) {
        acc.add(l, Vec::set(Vec(0.0f), Vec::loadu(v + j, c) - shift, c));
      });
      shifted_sum = acc.sum();
    }
    mean = v[0] + shifted_sum * inv_n;
  }
  // Second pass over the cached row: sum of squared deviations (no cancellation).
  const Vec m(mean);
  LaneSums acc;
  vec_loop_lanes(n, [&](int64_t j, int64_t c, int l) {
    const Vec d = Vec::set(Vec(0.0f), Vec::loadu(v + j, c) - m, c);
    acc.fmadd(l, d, d);
  });
  const float squares = acc.sum();
  if (m2 != nullptr) *m2 = squares;
  rstd = 1.0f / std::sqrt(std::max(squares * inv_n, 0.0f) + eps);
}

// Gated (IA then the gate's activation, never kNone): a row of x is [gate | up], 2n wide, and
// a = IA(gate)·up (kernels.h).
template <typename T, Activation IA, bool Gated>
void norm_forward_typed(const NormForward& a) {
  const int64_t n = a.cols;
  const int64_t x_cols = Gated ? 2 * n : n;
  for_rows(a.rows, n, 0, [&](int64_t rb, int64_t re, int64_t) {
    // What the row loops read, as locals of this block: a vector store may alias anything
    // (at::vec stores through may_alias types), so values read through `a` or a capture were
    // loaded again after every store (docs/design.md, Decisions).
    const float* const gamma = a.gamma;
    const float* const beta = a.beta;
    const RowPrefetch x_ahead(static_cast<const T*>(a.x), a.x_stride, a.rows, x_cols);
    const RowPrefetch residual_ahead(static_cast<const T*>(a.residual), a.residual_stride, a.rows,
                                     n);
    const RowPrefetch y_ahead(static_cast<const T*>(a.y), a.y_stride, a.rows, n);
    const RowPrefetch sum_ahead(static_cast<const T*>(a.sum), a.sum_stride, a.rows, n);
    const auto buffer = row_scratch(x_cols + 2 * n);
    float* v_buf = buffer.get();
    float* y_buf = v_buf + x_cols;
    float* r_buf = y_buf + n;
    const Vec alpha(a.alpha);
    // The rows ahead are touched in the first sweep when there is one (the long one, with the
    // activation), else in the normalising pass. The touches are written out in each loop on
    // purpose: behind a helper lambda GCC kept the pointers in memory (docs/design.md, Decisions).
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
        if (r != nullptr) first = round_vec<T>(at::vec::fmadd(alpha, Vec(r[0]), first));
        if constexpr (IA != Activation::kNone) {
          first = act_forward<IA>(first);
          if constexpr (Gated) first = first * Vec(xf[n]);
          first = round_vec<T>(first);
        }
        const Vec shift(hfirst(first));
        LaneSums acc;
        vec_loop_lanes(n, [&](int64_t j, int64_t c, int l) {
          x_ahead.touch(next_x, j);
          if constexpr (Gated) x_ahead.touch(next_x, n + j);
          residual_ahead.touch(next_residual, j);
          y_ahead.touch_for_write(next_y, j);
          sum_ahead.touch_for_write(next_sum, j);
          Vec sv = Vec::loadu(xf + j, c);
          // s rounded to T: the statistics are those of s as stored, which the backward reads.
          if (r != nullptr) sv = round_vec<T>(at::vec::fmadd(alpha, Vec::loadu(r + j, c), sv));
          if (s_out != nullptr) sv.store(s_out + j, c);
          Vec av = sv;
          if constexpr (IA != Activation::kNone) {
            av = act_forward<IA>(sv);
            if constexpr (Gated) av = av * Vec::loadu(xf + n + j, c);
            av = round_vec<T>(av);
          }
          av.store(v_buf + j, c);
          acc.add(l, Vec::set(Vec(0.0f), av - shift, c));
        });
        if (s_out != nullptr) write_row(s_out, static_cast<T*>(a.sum) + i * a.sum_stride, n);
        shifted_sum = acc.sum();
        v = v_buf;
      }
      float mean, rstd;
      row_stats(a.norm, v, n, a.eps, shifted_sum, mean, rstd,
                a.m2 == nullptr ? nullptr : a.m2 + i);
      if (a.mean != nullptr && a.norm == Norm::kLayer) a.mean[i] = mean;
      if (a.rstd != nullptr && a.norm != Norm::kNone) a.rstd[i] = rstd;
      if (a.y == nullptr) continue;

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
          if (gamma != nullptr) out = out * Vec::loadu(gamma + j, c);
          if (beta != nullptr) out = out + Vec::loadu(beta + j, c);
          out.store(y + j, c);
        });
      }
      store_row(y, y_row, n);
    }
  });
}

}  // namespace

void norm_forward(const NormForward& a) {
  with_dtype(a.dtype, [&](auto t) {
    with_input_activation(a.input_activation, [&](auto ia, auto gated) {
      norm_forward_typed<decltype(t), decltype(ia)::value, decltype(gated)::value>(a);
    });
  });
}

}  // namespace magneto::cpu::MAGNETO_ISA
