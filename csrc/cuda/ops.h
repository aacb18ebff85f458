// The CUDA ops at the tensor level, called by csrc/api.cpp once it has checked every argument and
// allocated the outputs: they fill the launchers' parameter structs (csrc/cuda/kernels.h) and
// order the kernels and cuBLAS GEMMs, on the current stream of x's device. Compiled only in CUDA
// builds (MAGNETO_WITH_CUDA). Every tensor is contiguous, on x's device and shaped as api.cpp
// checked it; an empty output (numel 0) is one the caller does not want.
#pragma once

#include <tuple>

#include "tensor_utils.h"

namespace magneto::cuda {

// y = N(in_act(x + alpha·residual))·gamma + beta, with the sum written to `sum` (when defined)
// and the statistics to mean/rstd (when non-empty). With saved_mean/saved_rstd given, those
// statistics are applied instead of computed (the recompute of h in ln_linear's backward).
// A gated input_activation takes x of 2·K columns ([gate | up]) and no residual; y is (rows, K).
void run_norm_forward(const Tensor& x, const OptTensor& residual, double alpha,
                      const OptTensor& gamma, const OptTensor& beta, double eps, Norm norm,
                      Activation input_activation, const Tensor& y, const Tensor& sum,
                      const Tensor& mean, const Tensor& rstd, const Tensor& saved_mean = Tensor(),
                      const Tensor& saved_rstd = Tensor());

// Norm backward into dx, dgamma and dbeta (each optional: empty when not wanted). dy is (rows, K);
// x and dx are (rows, 2·K) for a gated input_activation (no grad_accum then), else (rows, K).
void run_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& gamma,
                       const OptTensor& beta, const Tensor& mean, const Tensor& rstd,
                       const OptTensor& grad_accum, Norm norm, Activation input_activation,
                       const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta);

// ln_linear forward: (out, preact); fills mean and rstd.
std::tuple<Tensor, Tensor> run_ln_linear(const Tensor& x, const OptTensor& ln_weight,
                                         const OptTensor& ln_bias, const Tensor& weight,
                                         const OptTensor& bias, const OptTensor& residual,
                                         const OptTensor& seed, double eps, Norm norm,
                                         Activation input_activation, Activation activation,
                                         double alpha, double dropout_p, const Tensor& mean,
                                         const Tensor& rstd);

// ln_linear backward into the allocated gradients; returns dx, which is dh itself when the
// prologue (norm and input activation) is the identity.
Tensor run_ln_linear_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& ln_weight,
                              const OptTensor& ln_bias, const Tensor& weight, const Tensor& mean,
                              const Tensor& rstd, const Tensor& preact, const OptTensor& seed,
                              Norm norm, Activation input_activation, Activation activation,
                              double dropout_p, Tensor dx, const Tensor& dgamma,
                              const Tensor& dbeta, Tensor dweight, Tensor dbias);

}  // namespace magneto::cuda
