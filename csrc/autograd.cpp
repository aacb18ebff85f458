// The native op family's Autograd-key kernels: the formulas of magneto_kernels/library.py (where
// the triton family runs them in Python), here in C++ so that a call that records a graph runs no
// Python between the dispatcher and the kernel (bench/bench_overhead.py: a Python
// autograd.Function costs ~15-20 µs per call, more than a decode-size kernel).
//
// Each kernel calls its op below the Autograd key, directly when no gradient is wanted, else
// inside a torch::autograd::Function whose backward calls the op's backward op. Both go through
// the dispatcher, so one kernel serves the CPU, CUDA and emulated-CUDA kernels and, under
// torch.compile, the fake impls. The conventions (the empty absent outputs, output_mask) are
// the op contract's (magneto_kernels/library.py, docs/design.md).
//
// _C registers these for the process; _C_emu, which compiles this file too, registers only the
// CPU kernels (csrc/api.cpp).
#ifndef MAGNETO_CUDA_EMULATE

#include <array>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "native_ops.h"

namespace magneto {
namespace {

using native_ops::OptTensor;
using native_ops::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace native_ops;

bool requires_grad(const Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

// Whether this call records a graph: grad mode on and some tensor argument requiring grad.
template <typename... Ts>
bool records_graph(const Ts&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// An optional tensor as a saved tensor (undefined when absent), and back.
Tensor value_or_undefined(const OptTensor& t) { return t.value_or(Tensor()); }
OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A gradient the backward op returned: undefined where it was not asked for (the op returns an
// empty tensor there).
Tensor wanted(const Tensor& grad, bool asked) { return asked ? grad : Tensor(); }

// torch::autograd::Function gives autograd edges only to the tensor arguments that are present:
// the edge index of each of the first N tensor arguments, -1 for an absent one.
template <size_t N>
std::array<int, N> edge_indices(const std::array<bool, N>& present) {
  std::array<int, N> index{};
  int next = 0;
  for (size_t i = 0; i < N; ++i) index[i] = present[i] ? next++ : -1;
  return index;
}

bool needs_grad(AutogradContext* ctx, int edge) {
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

// ----------------------------------------------------------------------------------- layer_norm

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, double eps, c10::string_view norm) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, rstd] = layer_norm_op().call(x, weight, bias, eps, norm);
    ctx->save_for_backward(
        {x, value_or_undefined(weight), value_or_undefined(bias), mean, rstd});
    ctx->saved_data["norm"] = std::string(norm);
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const auto edge = edge_indices<3>({true, weight.defined(), bias.defined()});
    const c10::List<bool> mask(
        {needs_grad(ctx, edge[0]), needs_grad(ctx, edge[1]), needs_grad(ctx, edge[2])});
    const std::string norm = ctx->saved_data["norm"].toStringRef();
    auto [dx, dweight, dbias] = layer_norm_backward_op().call(
        grads[0].contiguous(), x, optional_of(weight), optional_of(bias), saved[3], saved[4],
        std::nullopt, norm, mask);
    return {wanted(dx, mask[0]), wanted(dweight, mask[1]), wanted(dbias, mask[2]), Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_autograd(const Tensor& x, const OptTensor& weight,
                                                       const OptTensor& bias, double eps,
                                                       c10::string_view norm) {
  if (!records_graph(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return layer_norm_op().call(x, weight, bias, eps, norm);
  }
  const variable_list out = LayerNormFunction::apply(x, weight, bias, eps, norm);
  return {out[0], out[1], out[2]};
}

// ------------------------------------------------------------------------------- add_layer_norm

struct AddLayerNormFunction : torch::autograd::Function<AddLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual,
                               const OptTensor& weight, const OptTensor& bias, double eps,
                               double alpha, c10::string_view norm) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, sum, mean, rstd] =
        add_layer_norm_op().call(x, residual, weight, bias, eps, alpha, norm);
    // The backward needs the sum s = alpha·residual + x, not x and residual.
    ctx->save_for_backward(
        {sum, value_or_undefined(weight), value_or_undefined(bias), mean, rstd});
    ctx->saved_data["norm"] = std::string(norm);
    ctx->saved_data["alpha"] = alpha;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, sum, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &sum = saved[0], &weight = saved[1], &bias = saved[2];
    const auto edge = edge_indices<4>({true, true, weight.defined(), bias.defined()});
    // ds serves both x's and the residual's gradient, so it is always computed.
    const c10::List<bool> mask({true, needs_grad(ctx, edge[2]), needs_grad(ctx, edge[3])});
    const std::string norm = ctx->saved_data["norm"].toStringRef();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    // The sum's own gradient (when the sum is used after the op) joins ds in the kernel.
    auto [ds, dweight, dbias] = layer_norm_backward_op().call(
        grads[0].contiguous(), sum, optional_of(weight), optional_of(bias), saved[3], saved[4],
        grads[1].defined() ? OptTensor(grads[1].contiguous()) : std::nullopt, norm, mask);
    Tensor dresidual;
    if (needs_grad(ctx, edge[1])) dresidual = alpha == 1.0 ? ds : ds * alpha;
    return {needs_grad(ctx, edge[0]) ? ds : Tensor(),
            dresidual,
            wanted(dweight, mask[1]),
            wanted(dbias, mask[2]),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_autograd(
    const Tensor& x, const Tensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, double alpha, c10::string_view norm) {
  if (!records_graph(x, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return add_layer_norm_op().call(x, residual, weight, bias, eps, alpha, norm);
  }
  const variable_list out =
      AddLayerNormFunction::apply(x, residual, weight, bias, eps, alpha, norm);
  return {out[0], out[1], out[2], out[3]};
}

// ------------------------------------------------------------------------------------ ln_linear

struct LnLinearFunction : torch::autograd::Function<LnLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& ln_weight,
                               const OptTensor& ln_bias, const Tensor& weight,
                               const OptTensor& bias, const OptTensor& residual,
                               const OptTensor& seed, double eps, c10::string_view norm,
                               c10::string_view input_activation, c10::string_view activation,
                               double alpha, double dropout_p) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, rstd, preact] =
        ln_linear_op().call(x, ln_weight, ln_bias, weight, bias, residual, seed, eps, norm,
                            input_activation, activation, alpha, dropout_p);
    // Only x is saved of the input side: the norm's output, and a gated input activation's
    // product, are recomputed in the backward.
    ctx->save_for_backward({x, value_or_undefined(ln_weight), value_or_undefined(ln_bias), weight,
                            mean, rstd, preact, value_or_undefined(seed)});
    ctx->saved_data["norm"] = std::string(norm);
    ctx->saved_data["input_activation"] = std::string(input_activation);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->mark_non_differentiable({mean, rstd, preact});
    return {out, mean, rstd, preact};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &ln_weight = saved[1], &ln_bias = saved[2], &weight = saved[3];
    const Tensor& seed = saved[7];
    auto& data = ctx->saved_data;
    // Edges of x, ln_weight, ln_bias, weight, bias, residual (seed, last, never needs one).
    const auto edge = edge_indices<6>({true, ln_weight.defined(), ln_bias.defined(), true,
                                       data["has_bias"].toBool(), data["has_residual"].toBool()});
    const c10::List<bool> mask({needs_grad(ctx, edge[0]), needs_grad(ctx, edge[1]),
                                needs_grad(ctx, edge[2]), needs_grad(ctx, edge[3]),
                                needs_grad(ctx, edge[4])});
    const Tensor grad_out = grads[0].contiguous();
    variable_list result(13);
    if (mask[0] || mask[1] || mask[2] || mask[3] || mask[4]) {
      auto [dx, dln_weight, dln_bias, dweight, dbias] = ln_linear_backward_op().call(
          grad_out, x, optional_of(ln_weight), optional_of(ln_bias), weight, saved[4], saved[5],
          saved[6], optional_of(seed),
          data["norm"].toStringRef(), data["input_activation"].toStringRef(),
          data["activation"].toStringRef(), data["dropout_p"].toDouble(), mask);
      result[0] = wanted(dx, mask[0]);
      result[1] = wanted(dln_weight, mask[1]);
      result[2] = wanted(dln_bias, mask[2]);
      result[3] = wanted(dweight, mask[3]);
      result[4] = wanted(dbias, mask[4]);
    }
    if (needs_grad(ctx, edge[5])) {
      const double alpha = data["alpha"].toDouble();
      result[5] = alpha == 1.0 ? grad_out : grad_out * alpha;
    }
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> ln_linear_autograd(
    const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& weight,
    const OptTensor& bias, const OptTensor& residual, const OptTensor& seed, double eps,
    c10::string_view norm, c10::string_view input_activation, c10::string_view activation,
    double alpha, double dropout_p) {
  if (!records_graph(x, ln_weight, ln_bias, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return ln_linear_op().call(x, ln_weight, ln_bias, weight, bias, residual, seed, eps, norm,
                               input_activation, activation, alpha, dropout_p);
  }
  const variable_list out =
      LnLinearFunction::apply(x, ln_weight, ln_bias, weight, bias, residual, seed, eps, norm,
                              input_activation, activation, alpha, dropout_p);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace magneto

TORCH_LIBRARY_IMPL(magneto, Autograd, m) {
  m.impl("layer_norm_native", TORCH_FN(magneto::layer_norm_autograd));
  m.impl("add_layer_norm_native", TORCH_FN(magneto::add_layer_norm_autograd));
  m.impl("ln_linear_native", TORCH_FN(magneto::ln_linear_autograd));
}

#endif  // MAGNETO_CUDA_EMULATE
