// The passes over ln_linear's GEMM output (kernels.h): the epilogue (activation, dropout,
// residual), its backward (dz and dbias) and the accumulator alpha·residual + bias.
#pragma once

#include "cpu/activations.h"
#include "cpu/kernels.h"
#include "cpu/philox.h"
#include "cpu/rows.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

// --------------------------------------------------------------------------- linear epilogues

template <typename T, Activation A>
void linear_epilogue_typed(const LinearEpilogue& a) {
  const int64_t n = a.cols;
  const bool drop = a.dropout_p > 0.0;
  const Dropout dropout(a.seed, a.dropout_p);
  for_rows(a.rows, n, 0, [&](int64_t rb, int64_t re, int64_t) {
    const auto buffer = row_scratch(3 * n);
    float* preact_buf = buffer.get();
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
    const auto buffer = row_scratch(3 * n);
    float* dy_buf = buffer.get();
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
    const auto buffer = row_scratch(2 * cols);
    float* r_buf = buffer.get();
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

}  // namespace

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
