// The activations and their derivatives on float32 vectors, and the dispatch from an activation
// code (common.h) to a compile-time constant inside the row loops.
#pragma once

#include <type_traits>

#include <c10/util/bit_cast.h>

#include "cpu/rows.h"

namespace magneto::cpu::MAGNETO_ISA {
namespace {

// ------------------------------------------------------------------------------ activations

constexpr float kSqrtHalf = 0.70710678118654752440f;     // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1/sqrt(2 pi)
constexpr float kTanhBeta = 0.79788456080286535588f;     // sqrt(2/pi)
constexpr float kTanhKappa = 0.044715f;
constexpr float kLog2e = 1.44269504088896340736f;
// ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with 15 significant bits (n·kLn2Hi exact for |n| < 512).
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187045e-06f;

// exp(−z²/2) for z >= 0 to a few ulps: z² formed exactly as hi + lo (z split into its upper 12
// significand bits and the rest, so that every product is exact without an FMA, which the
// portable build lacks), exp(−hi) by Cody–Waite reduction (hi = n·ln 2 − r, n·ln2_hi exact) and
// a degree-7 Taylor polynomial on |r| <= ln 2 / 2, exp(−lo) as 1 − lo. A rounded −z²/2 would
// instead err by up to z²/2 ulps. hi is clamped at 87.3, so the result bottoms out near 2^-126
// (~1.2e-38) instead of underflowing; Φ there is below float32's normal range anyway.
// The clamps are clamp_max (one min instruction, which passes a NaN argument through), not
// at::vec::minimum, whose explicit NaN test doubled GELU's cost on AVX-512 (docs/design.md,
// Decisions).
inline Vec exp_neg_half_square(const Vec& z) {
  const Vec z_hi = z & Vec(c10::bit_cast<float>(0xFFFFF000u));
  const Vec z_lo = z - z_hi;
  const Vec hi = at::vec::clamp_max(Vec(0.5f) * z_hi * z_hi, Vec(87.3f));
  const Vec lo = Vec(0.5f) * at::vec::fmadd(z_lo, z_lo, Vec(2.0f) * z_hi * z_lo);
  const Vec n = (hi * Vec(-kLog2e)).round();  // in [-126, 0]
  const Vec r = (n * Vec(-kLn2Lo) - lo) + (n * Vec(-kLn2Hi) - hi);
  Vec p = at::vec::fmadd(Vec(1.0f / 5040.0f), r, Vec(1.0f / 720.0f));
  p = at::vec::fmadd(p, r, Vec(1.0f / 120.0f));
  p = at::vec::fmadd(p, r, Vec(1.0f / 24.0f));
  p = at::vec::fmadd(p, r, Vec(1.0f / 6.0f));
  p = at::vec::fmadd(p, r, Vec(0.5f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  // (n + 127)·2^23, exact in float for n in [-126, 0], is the bit pattern of 2^n.
  const Vec pow2_bits = at::vec::fmadd(n, Vec(8388608.0f), Vec(1065353216.0f));
  return p * at::vec::cast<float>(at::vec::convert_to_int_of_same_size(pow2_bits));
}

// The normal CDF Φ(x) and density φ(x) that GELU and its derivative are made of, sharing one
// exp(−x²/2). The tail Φ(−z), z = |x|, is φ(z) times a smooth function of z (Mills' ratio),
// written with q = (z − K)/(z + K) ∈ [−1, 1) as Φ(−z) = (1 − q)·m(q)·exp(−z²/2), m a degree-9
// polynomial fitted for relative error (0.11 ulp in exact arithmetic, K = 3.5, z <= 13.5; beyond,
// Φ(−z) < 2^-126); Φ(x) = 1 − Φ(−|x|) for x >= 0. About 2 ulps on the tail in float arithmetic,
// where Abramowitz–Stegun 7.1.26 (at::vec's erf) errs 7.5e-8 absolute, far more than an ulp of
// a small tail. tests/test_ops_cpu.py::test_gelu_accuracy checks GELU and its derivative
// element by element on every instruction set.
inline void gelu_cdf_pdf(const Vec& x, Vec& cdf, Vec& pdf) {
  constexpr float kMillsK = 3.5f;
  const Vec z = x.abs();
  const Vec zc = at::vec::clamp_max(z, Vec(13.5f));
  const Vec inv = Vec(1.0f) / (zc + Vec(kMillsK));
  const Vec q = (zc - Vec(kMillsK)) * inv;
  Vec m = at::vec::fmadd(Vec(1.682307083683554e-05f), q, Vec(6.198870687512681e-05f));
  m = at::vec::fmadd(m, q, Vec(-7.077686314005405e-05f));
  m = at::vec::fmadd(m, q, Vec(-0.00045481693814508617f));
  m = at::vec::fmadd(m, q, Vec(0.0009273769101127982f));
  m = at::vec::fmadd(m, q, Vec(0.0024869022890925407f));
  m = at::vec::fmadd(m, q, Vec(-0.016578959301114082f));
  m = at::vec::fmadd(m, q, Vec(0.04506069794297218f));
  m = at::vec::fmadd(m, q, Vec(-0.08079453557729721f));
  m = at::vec::fmadd(m, q, Vec(0.10634515434503555f));
  // exp(−x²/2), 0 beyond the clamp: Φ(−z) and φ(z) lie below float32's normal range there, and
  // z² overflows the exact split above ~1.8e19 (x·Φ(x) was ±inf). A NaN x fails the test but
  // stays NaN through x·Φ(x) and Φ(x) + x·φ(x).
  const Vec e = exp_neg_half_square(z) & (z <= Vec(13.5f));
  const Vec tail = (Vec(2.0f * kMillsK) * inv) * m * e;  // Φ(−|x|)
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
