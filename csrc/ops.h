// The native family's ops, once for every backend: each checks its arguments (csrc/checks.cpp),
// allocates the outputs the contract fixes (magneto_kernels/library.py: statistics, absent
// outputs empty) and runs Backend's kernels (backend.h). csrc/register.cpp registers them per
// dispatch key with Backend = cpu::Kernels or cuda::Kernels.
#pragma once

#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace magneto::ops {

// Per-row float32 statistics of the (rows, cols) x, or an empty tensor where the norm has none.
inline Tensor stats(const Tensor& x, bool present) {
  return new_tensor({present ? x.size(0) : 0}, x.options().dtype(at::kFloat));
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> layer_norm(const schema::LayerNorm& call) {
  const NormArgs a = parse(call);
  const NormOutputs out{new_like(a.x), Tensor(), stats(a.x, a.norm == Norm::kLayer),
                        stats(a.x, true)};
  Backend::norm_forward(a, out);
  return {with_rows_of(out.y, call.x), out.mean, out.rstd};
}

// (mean, m2): mean empty for RMSNorm, m2 the row's sum of squared deviations (squares for
// RMSNorm), of in_act(x).
template <class Backend>
std::tuple<Tensor, Tensor> norm_stats(const schema::NormStats& call) {
  const NormArgs a = parse(call);
  NormOutputs out{Tensor(), Tensor(), stats(a.x, a.norm == Norm::kLayer), Tensor(),
                  stats(a.x, true)};
  Backend::norm_forward(a, out);
  return {out.mean, out.m2};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm(const schema::AddLayerNorm& call) {
  const NormArgs a = parse(call);
  const NormOutputs out{new_like(a.x), new_like(a.x), stats(a.x, a.norm == Norm::kLayer),
                        stats(a.x, true)};
  Backend::norm_forward(a, out);
  return {with_rows_of(out.y, call.x), with_rows_of(out.sum, call.x), out.mean, out.rstd};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const schema::LayerNormBackward& call) {
  const NormBackwardArgs a = parse(call);
  const auto want = mask_of<3>(call.output_mask);
  const NormGrads g{want[0] ? new_like(a.x) : empty0(a.x),
                    want[1] && a.gamma.has_value() ? new_like(*a.gamma) : empty0(a.x),
                    want[2] && a.beta.has_value() ? new_like(*a.beta) : empty0(a.x)};
  if (g.dx.numel() > 0 || g.dgamma.numel() > 0 || g.dbeta.numel() > 0) {
    Backend::norm_backward(a, g);
  }
  return {with_rows_of(g.dx, call.x), g.dgamma, g.dbeta};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> ln_linear(const schema::LnLinear& call) {
  const LnLinearArgs a = parse(call);
  LnLinearOutputs out;
  // Given statistics come back as copies: an op's output never aliases its input.
  out.mean = a.given_mean.has_value() ? a.given_mean->clone() : stats(a.x, a.norm == Norm::kLayer);
  out.rstd = a.given_rstd.has_value() ? a.given_rstd->clone() : stats(a.x, a.norm != Norm::kNone);
  Backend::ln_linear(a, out);
  return {with_rows_of(out.out, call.x), out.mean, out.rstd, with_rows_of(out.preact, call.x)};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_linear_backward(
    const schema::LnLinearBackward& call) {
  const LnLinearBackwardArgs a = parse(call);
  const auto want = mask_of<5>(call.output_mask);
  const Tensor& x = a.x;
  LnLinearGrads g{want[0] ? new_like(x) : empty0(x),
                  want[1] && a.ln_weight.has_value() ? new_like(*a.ln_weight) : empty0(x),
                  want[2] && a.ln_bias.has_value() ? new_like(*a.ln_bias) : empty0(x),
                  want[3] ? new_like(a.weight) : empty0(x),
                  want[4] ? new_tensor({a.weight.size(0)}, a.weight.options()) : empty0(x)};
  Backend::ln_linear_backward(a, g);
  return {with_rows_of(g.dx, call.x), g.dln_weight, g.dln_bias, g.dweight, g.dbias};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> ln_linear_backward_partial(
    const schema::LnLinearBackwardPartial& call) {
  const LnLinearBackwardArgs a = parse(static_cast<const schema::LnLinearBackward&>(call));
  TORCH_CHECK_VALUE(a.norm != Norm::kNone && !is_offline(a.quant),
                    "ln_linear_backward_partial needs a norm and quant 'none' or 'bitnet_online'");
  const auto want = mask_of<3>(call.output_mask);
  const Tensor& x = a.x;
  LnLinearGrads g{empty0(x),
                  empty0(x),
                  empty0(x),
                  want[1] ? new_like(a.weight) : empty0(x),
                  want[2] ? new_tensor({a.weight.size(0)}, a.weight.options()) : empty0(x),
                  want[0] ? new_tensor({x.size(0), a.weight.size(1)}, x.options()) : empty0(x),
                  want[0] ? new_tensor({x.size(0), a.norm == Norm::kLayer ? 2 : 1},
                                       x.options().dtype(at::kFloat))
                          : empty0(x)};
  Backend::ln_linear_backward(a, g);
  return {with_rows_of(g.dh, call.x), g.row_sums, g.dweight, g.dbias};
}

template <class Backend>
Tensor dropout(const schema::Dropout& call) {
  const DropoutArgs a = parse(call);
  const Tensor y = new_like(a.x);
  Backend::dropout(a, y);
  return with_rows_of(y, call.x);
}

template <class Backend>
std::tuple<std::vector<Tensor>, Tensor, Tensor> ln_linear_group(const schema::LnLinearGroup& call) {
  const LnLinearGroupArgs a = parse(call);
  LnLinearGroupOutputs out;
  out.mean = stats(a.x, a.norm == Norm::kLayer);
  out.rstd = stats(a.x, a.norm != Norm::kNone);
  Backend::ln_linear_group(a, out);
  for (Tensor& o : out.outs) o = with_rows_of(o, call.x);
  return {std::move(out.outs), out.mean, out.rstd};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>>
ln_linear_group_backward(const schema::LnLinearGroupBackward& call) {
  const LnLinearGroupBackwardArgs a = parse(call);
  const size_t n = a.weights.size();
  const std::vector<bool> want = mask_of(call.output_mask, 3 + 2 * n);
  const Tensor& x = a.x;
  LnLinearGroupGrads g{want[0] ? new_like(x) : empty0(x),
                       want[1] && a.ln_weight.has_value() ? new_like(*a.ln_weight) : empty0(x),
                       want[2] && a.ln_bias.has_value() ? new_like(*a.ln_bias) : empty0(x),
                       {},
                       {}};
  for (size_t i = 0; i < n; ++i) {
    const Tensor& w = a.weights[i];
    g.dweights.push_back(want[3 + i] ? new_like(w) : empty0(x));
    g.dbiases.push_back(want[3 + n + i] ? new_tensor({w.size(0)}, w.options()) : empty0(x));
  }
  Backend::ln_linear_group_backward(a, g);
  return {with_rows_of(g.dx, call.x), g.dln_weight, g.dln_bias, std::move(g.dweights),
          std::move(g.dbiases)};
}

}  // namespace magneto::ops
