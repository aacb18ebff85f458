// The norm backward (kernels.h, NormBackward), fused with the input activation's derivative and
// the recompute of h, a row at a time, with deterministic dgamma/dbeta.
#pragma once

#include "cpu/activations.h"
#include "cpu/kernels.h"
#include "cpu/rows.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

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

  for_rows(a.rows, n, chunks, [&](int64_t rb, int64_t re, int64_t chunk) {
    // Locals of this block, as in norm_forward_typed: values read through `a` or a capture were
    // loaded again after every vector store.
    const float* const gamma = a.gamma;
    const float* const beta = a.beta;
    const RowPrefetch x_ahead(static_cast<const T*>(a.x), a.x_stride, a.rows, x_cols);
    const RowPrefetch dy_ahead(static_cast<const T*>(a.dy), a.dy_stride, a.rows, n);
    const RowPrefetch h_ahead(static_cast<const T*>(a.h), a.h_stride, a.rows, n);
    // dx written in place of dy is in cache already.
    const RowPrefetch dx_ahead = !want_dx || a.dx == a.dy
        ? RowPrefetch()
        : RowPrefetch(static_cast<const T*>(a.dx), a.dx_stride, a.rows, x_cols);
    const auto buffer = row_scratch(2 * x_cols + (Gated ? 5 : 4) * n);
    float* x_buf = buffer.get();     // x as floats (the input activation's argument)
    float* xh_buf = x_buf + x_cols;   // xhat (with an input activation)
    float* da_buf = xh_buf + n;       // in_act'(x); gated ∂a/∂gate = up·IA'(gate)
    float* dy_buf = da_buf + n;
    float* out_buf = dy_buf + n;      // dx or h before conversion
    float* acc_buf = out_buf + x_cols;  // grad_accum
    float* act_buf = acc_buf + n;     // gated: ∂a/∂up = IA(gate)
    float* pg = a.dgamma != nullptr && chunk >= 0 ? dgamma_part.data() + chunk * n : nullptr;
    float* pb = a.dbeta != nullptr && chunk >= 0 ? dbeta_part.data() + chunk * n : nullptr;
    const bool affine = !none && gamma != nullptr;
    const bool shift = !none && beta != nullptr;
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
      // It is the longer sweep, so it also touches the rows ahead, to read and to write
      // (docs/design.md, Decisions).
      LaneSums sum_g, sum_gxhat;
      const char* next_x = x_ahead.after(i);
      const char* next_dy = dy_ahead.after(i);
      const char* next_h = h_ahead.after(i);
      const char* next_dx = dx_ahead.after(i);
      // Inlined (each form has one call): called, its captures were read through memory.
      auto sweep1 = [&](auto with_h, auto with_dy) __attribute__((always_inline)) {
        vec_loop_lanes(n, [&](int64_t j, int64_t c, int l) {
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
            Vec out = affine ? xh * Vec::loadu(gamma + j, c) : xh;
            if (shift) out = out + Vec::loadu(beta + j, c);
            out.store(h + j, c);
          }
          if constexpr (decltype(with_dy)::value) {
            const Vec d = Vec::loadu(dy + j, c);
            if (pg != nullptr) at::vec::fmadd(d, xh, Vec::loadu(pg + j, c)).store(pg + j, c);
            if (pb != nullptr) (d + Vec::loadu(pb + j, c)).store(pb + j, c);
            const Vec g = affine ? d * Vec::loadu(gamma + j, c) : d;
            sum_g.add(l, g);
            sum_gxhat.fmadd(l, g, xh);
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
      const int64_t sums = layer ? 2 : 1;
      if (a.row_sums != nullptr) {
        if (layer) a.row_sums[i * sums] = sum_g.sum();
        a.row_sums[i * sums + sums - 1] = sum_gxhat.sum();
      }
      if (!want_dx) continue;

      const float inv_n = 1.0f / static_cast<float>(n);
      const float* means = a.row_means == nullptr ? nullptr : a.row_means + i * sums;
      const Vec mean_g(!layer ? 0.0f : means != nullptr ? means[0] : sum_g.sum() * inv_n);
      const Vec mean_gxhat(none                ? 0.0f
                           : means != nullptr ? means[sums - 1]
                                              : sum_gxhat.sum() * inv_n);
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
          const Vec g = affine ? d * Vec::loadu(gamma + j, c) : d;
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

}  // namespace

void norm_backward(const NormBackward& a) {
  with_dtype(a.dtype, [&](auto t) {
    with_input_activation(a.input_activation, [&](auto ia, auto gated) {
      norm_backward_typed<decltype(t), decltype(ia)::value, decltype(gated)::value>(a);
    });
  });
}

}  // namespace magneto::cpu::MAGNETO_ISA
