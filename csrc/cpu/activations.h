// The activations and their derivatives on float32 vectors, and the dispatch from an activation
// code (common.h) to a compile-time constant inside the row loops.
#pragma once

#include <type_traits>

#include "cpu/rows.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

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
// Fewer instructions than at::vec's exp_u20 (docs/design.md, Decisions).
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

}  // namespace

}  // namespace magneto::cpu::MAGNETO_ISA
