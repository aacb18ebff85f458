// The Autograd-key kernels of the op families: the op contract's autograd formulas
// (docs/design.md, The op contract), in C++ so that a call that records a graph runs no Python
// between the dispatcher and the kernel (a Python autograd.Function costs more than a
// decode-size kernel: docs/design.md, Decisions).
//
// Each kernel calls its op below the Autograd key: directly when the call records no graph, else
// inside a torch::autograd::Function whose backward calls the op's backward op. Both go through
// the dispatcher, so one kernel serves the CPU, CUDA and emulated-CUDA kernels and, under
// torch.compile, the fake impls. The conventions (the empty absent outputs, output_mask) are
// the op contract's (magneto_kernels/library.py).
//
// _C registers these for the process; the emulated build (_C_emu) does not compile this file.
#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "schema.h"

namespace magneto {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool requires_grad(const Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

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

// A backward op's output_mask, from the gradients autograd needs.
template <size_t N>
c10::List<bool> output_mask(AutogradContext* ctx, const std::array<int, N>& edges) {
  c10::List<bool> mask;
  for (int edge : edges) mask.push_back(needs_grad(ctx, edge));
  return mask;
}

// An op's Signature, R(A...), taken apart: its result and its arguments as a tuple.
template <class Signature>
struct SignatureOf;
template <class R, class... A>
struct SignatureOf<R(A...)> {
  using Result = R;
  using Args = std::tuple<A...>;
};

// The autograd Function of one op (Formula::Op) of one family: Formula says which arguments are
// differentiable (inputs), what the forward saves (save) and how the gradients are formed
// (backward). The op's own arguments reach the forward as a tuple, so that the op is called with
// them as the dispatcher passed them. The type names the formula only, not the op's argument
// types: torch's CppNode demangles its Function's type name on every backward call
// (CppNode::apply passes name() along), which cost more than a small norm's kernel when the
// name spelled out an 18-argument signature (docs/design.md, Decisions).
template <class Formula>
struct Autograd : torch::autograd::Function<Autograd<Formula>> {
  using Op = typename Formula::Op;
  using R = typename SignatureOf<typename Op::Signature>::Result;
  using Args = typename SignatureOf<typename Op::Signature>::Args;
  // An op with one output (dropout) returns a Tensor, the others a tuple.
  static constexpr bool kOneOutput = std::is_same_v<R, Tensor>;

  // The differentiable inputs follow `pack` only so that autograd makes their edges.
  template <class... Inputs>
  static variable_list forward(AutogradContext* ctx, const Args* pack, const Inputs&...) {
    at::AutoDispatchBelowADInplaceOrView below;
    const R out = std::apply([](const auto&... a) { return Formula::op().call(a...); }, *pack);
    Formula::save(ctx, std::apply([](const auto&... a) { return Op{a...}; }, *pack), out);
    // An output without a gradient (the statistics, preact, an unused output) reaches the
    // backward undefined, not as a tensor of zeros allocated and filled for every call.
    ctx->set_materialize_grads(false);
    if constexpr (kOneOutput) {
      return {out};
    } else {
      return std::apply([](const auto&... t) { return variable_list{t...}; }, out);
    }
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // No output has a gradient: neither has any input (undefined: zero to autograd).
    if (std::none_of(grads.begin(), grads.end(), [](const Tensor& g) { return g.defined(); })) {
      return variable_list(1 + std::tuple_size_v<decltype(Formula::inputs(std::declval<Op>()))>);
    }
    variable_list result = Formula::backward(ctx, grads);
    result.insert(result.begin(), Tensor());  // pack's
    return result;
  }
};

// The Autograd-key kernel of the op: the op itself below the Autograd key when the call records
// no graph, else through Autograd<Formula>.
template <class Formula, class Signature = typename Formula::Op::Signature>
struct AutogradKernel;
template <class Formula, class R, class... A>
struct AutogradKernel<Formula, R(A...)> {
  using Function = Autograd<Formula>;

  static R kernel(A... args) {
    const typename Function::Op call{args...};
    const auto inputs = Formula::inputs(call);
    const bool records_graph =
        at::GradMode::is_enabled() &&
        std::apply([](const auto&... t) { return (requires_grad(t) || ...); }, inputs);
    if (!records_graph) {
      at::AutoDispatchBelowADInplaceOrView below;
      return Formula::op().call(args...);
    }
    const typename Function::Args pack(args...);
    const variable_list out = std::apply(
        [&](const auto&... t) { return Function::apply(&pack, t...); }, inputs);
    if constexpr (Function::kOneOutput) {
      return out[0];
    } else {
      return [&]<size_t... I>(std::index_sequence<I...>) {
        return R{out[I]...};
      }(std::make_index_sequence<std::tuple_size_v<R>>{});
    }
  }
};

// ----------------------------------------------------------------------------------- layer_norm

template <const char* Family>
struct LayerNormFormula {
  using Op = schema::LayerNorm;
  static const auto& op() { return op_handle<Op, Family>(); }
  static auto inputs(const Op& c) { return std::forward_as_tuple(c.x, c.weight, c.bias); }

  static void save(AutogradContext* ctx, const Op& c,
                   const std::tuple<Tensor, Tensor, Tensor>& out) {
    const auto& [y, mean, rstd] = out;
    ctx->save_for_backward({c.x, value_or_undefined(c.weight), value_or_undefined(c.bias), mean,
                            rstd});
    ctx->saved_data["norm"] = std::string(c.norm);
    ctx->mark_non_differentiable({mean, rstd});
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const auto mask = output_mask(ctx, edge_indices<3>({true, weight.defined(), bias.defined()}));
    auto [dx, dweight, dbias] = op_handle<schema::LayerNormBackward, Family>().call(
        grads[0], x, optional_of(weight), optional_of(bias), saved[3], saved[4], std::nullopt,
        ctx->saved_data["norm"].toStringRef(), mask, "none", std::nullopt);
    return {wanted(dx, mask[0]), wanted(dweight, mask[1]), wanted(dbias, mask[2])};
  }
};

// ------------------------------------------------------------------------------- add_layer_norm

template <const char* Family>
struct AddLayerNormFormula {
  using Op = schema::AddLayerNorm;
  static const auto& op() { return op_handle<Op, Family>(); }
  static auto inputs(const Op& c) {
    return std::forward_as_tuple(c.x, c.residual, c.weight, c.bias);
  }

  static void save(AutogradContext* ctx, const Op& c,
                   const std::tuple<Tensor, Tensor, Tensor, Tensor>& out) {
    const auto& [y, sum, mean, rstd] = out;
    // The backward needs the sum s = alpha·residual + x, not x and residual.
    ctx->save_for_backward({sum, value_or_undefined(c.weight), value_or_undefined(c.bias), mean,
                            rstd});
    ctx->saved_data["norm"] = std::string(c.norm);
    ctx->saved_data["alpha"] = c.alpha;
    ctx->mark_non_differentiable({mean, rstd});
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &sum = saved[0], &weight = saved[1], &bias = saved[2];
    const auto edge = edge_indices<4>({true, true, weight.defined(), bias.defined()});
    // ds serves both x's and the residual's gradient, so it is always computed.
    const c10::List<bool> mask({true, needs_grad(ctx, edge[2]), needs_grad(ctx, edge[3])});
    const double alpha = ctx->saved_data["alpha"].toDouble();
    // Only the sum used after the op: the kernel still takes y's gradient, as zeros.
    const Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(sum);
    // The sum's own gradient (when the sum is used after the op) joins ds in the kernel.
    auto [ds, dweight, dbias] = op_handle<schema::LayerNormBackward, Family>().call(
        dy, sum, optional_of(weight), optional_of(bias), saved[3], saved[4],
        optional_of(grads[1]), ctx->saved_data["norm"].toStringRef(), mask, "none",
        std::nullopt);
    Tensor dresidual;
    if (needs_grad(ctx, edge[1])) dresidual = alpha == 1.0 ? ds : ds * alpha;
    return {needs_grad(ctx, edge[0]) ? ds : Tensor(), dresidual, wanted(dweight, mask[1]),
            wanted(dbias, mask[2])};
  }
};

// ------------------------------------------------------------------------------------ ln_linear

template <const char* Family>
struct LnLinearFormula {
  using Op = schema::LnLinear;
  static const auto& op() { return op_handle<Op, Family>(); }
  static auto inputs(const Op& c) {
    return std::forward_as_tuple(c.x, c.ln_weight, c.ln_bias, c.weight, c.bias, c.residual);
  }

  static void save(AutogradContext* ctx, const Op& c,
                   const std::tuple<Tensor, Tensor, Tensor, Tensor>& out) {
    const auto& [y, mean, rstd, preact] = out;
    // Given statistics (and row amax) are another rank's too: their gradient goes through the
    // sharded norm's collectives, which magneto/parallel/functional.py runs around this op's two
    // backward halves.
    TORCH_CHECK_NOT_IMPLEMENTED(!c.rstd.has_value(),
                                "ln_linear with given mean and rstd has no autograd formula: "
                                "differentiate it as magneto.parallel does");
    TORCH_CHECK_NOT_IMPLEMENTED(!c.row_amax.has_value(),
                                "ln_linear with a given row_amax has no autograd formula: "
                                "differentiate it as magneto.parallel does");
    // Only x is saved of the input side: the norm's output, and a gated input activation's
    // product, are recomputed in the backward.
    ctx->save_for_backward({c.x, value_or_undefined(c.ln_weight), value_or_undefined(c.ln_bias),
                            c.weight, mean, rstd, preact, value_or_undefined(c.seed),
                            value_or_undefined(c.weight_scale)});
    ctx->saved_data["norm"] = std::string(c.norm);
    ctx->saved_data["input_activation"] = std::string(c.input_activation);
    ctx->saved_data["activation"] = std::string(c.activation);
    ctx->saved_data["alpha"] = c.alpha;
    ctx->saved_data["dropout_p"] = c.dropout_p;
    ctx->saved_data["has_bias"] = c.bias.has_value();
    ctx->saved_data["has_residual"] = c.residual.has_value();
    ctx->saved_data["quant"] = std::string(c.quant);
    ctx->mark_non_differentiable({mean, rstd, preact});
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &ln_weight = saved[1], &ln_bias = saved[2], &weight = saved[3];
    auto& data = ctx->saved_data;
    const auto edge = edge_indices<6>({true, ln_weight.defined(), ln_bias.defined(), true,
                                       data["has_bias"].toBool(), data["has_residual"].toBool()});
    const auto mask =
        output_mask(ctx, std::array<int, 5>{edge[0], edge[1], edge[2], edge[3], edge[4]});
    const Tensor& grad_out = grads[0];
    variable_list result(6);
    if (mask[0] || mask[1] || mask[2] || mask[3] || mask[4]) {
      auto [dx, dln_weight, dln_bias, dweight, dbias] =
          op_handle<schema::LnLinearBackward, Family>().call(
              grad_out, x, optional_of(ln_weight), optional_of(ln_bias), weight, saved[4],
              saved[5], saved[6], optional_of(saved[7]), data["norm"].toStringRef(),
              data["input_activation"].toStringRef(), data["activation"].toStringRef(),
              data["dropout_p"].toDouble(), mask, data["quant"].toStringRef(),
              optional_of(saved[8]), std::nullopt);
      result = {wanted(dx, mask[0]),      wanted(dln_weight, mask[1]), wanted(dln_bias, mask[2]),
                wanted(dweight, mask[3]), wanted(dbias, mask[4]),      Tensor()};
    }
    if (needs_grad(ctx, edge[5])) {
      const double alpha = data["alpha"].toDouble();
      result[5] = alpha == 1.0 ? grad_out : grad_out * alpha;
    }
    return result;
  }
};

// -------------------------------------------------------------------------------------- dropout

template <const char* Family>
struct DropoutFormula {
  using Op = schema::Dropout;
  static const auto& op() { return op_handle<Op, Family>(); }
  static auto inputs(const Op& c) { return std::forward_as_tuple(c.x); }

  static void save(AutogradContext* ctx, const Op& c, const Tensor& /*y*/) {
    ctx->save_for_backward({c.seed});
    ctx->saved_data["p"] = c.p;
  }

  // dx = dy ⊙ keep/(1−p): the op itself on the gradient, with the same seed (so the same mask).
  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    return {op().call(grads[0], saved[0], ctx->saved_data["p"].toDouble())};
  }
};

// ------------------------------------------------------------------------------ ln_linear_group

// Its arguments are lists (weights, biases) and its first output is one, which the Autograd
// template above does not take: the same pattern, written out. The autograd edges are x,
// ln_weight, ln_bias (when given), every weight, then the biases that are given.
template <const char* Family>
struct LnLinearGroupAutograd : torch::autograd::Function<LnLinearGroupAutograd<Family>> {
  using Op = schema::LnLinearGroup;
  using R = std::tuple<std::vector<Tensor>, Tensor, Tensor>;

  static R kernel(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                  at::TensorList weights, const c10::List<OptTensor>& biases, double eps,
                  std::string_view norm, std::string_view quant,
                  const OptTensor& weight_scales, bool concat) {
    std::vector<Tensor> given_biases;
    for (const OptTensor& b : biases) {
      if (b.has_value()) given_biases.push_back(*b);
    }
    bool records_graph = requires_grad(x) || requires_grad(ln_weight) || requires_grad(ln_bias);
    for (const Tensor& t : weights) records_graph = records_graph || requires_grad(t);
    for (const Tensor& t : given_biases) records_graph = records_graph || requires_grad(t);
    if (!at::GradMode::is_enabled() || !records_graph) {
      at::AutoDispatchBelowADInplaceOrView below;
      return op_handle<Op, Family>().call(x, ln_weight, ln_bias, weights, biases, eps, norm,
                                          quant, weight_scales, concat);
    }
    const Op call{x, ln_weight, ln_bias, weights, biases, eps, norm, quant, weight_scales, concat};
    const variable_list out = LnLinearGroupAutograd::apply(
        &call, x, ln_weight, ln_bias, weights, at::TensorList(given_biases));
    const size_t n = out.size() - 2;  // the outputs: one per weight, or the one concat output
    return {std::vector<Tensor>(out.begin(), out.begin() + n), out[n], out[n + 1]};
  }

  // The differentiable inputs follow `call` only so that autograd makes their edges.
  static variable_list forward(AutogradContext* ctx, const Op* call, const Tensor&,
                               const OptTensor&, const OptTensor&, at::TensorList,
                               at::TensorList) {
    at::AutoDispatchBelowADInplaceOrView below;
    const Op& c = *call;
    auto [outs, mean, rstd] = op_handle<Op, Family>().call(
        c.x, c.ln_weight, c.ln_bias, c.weights, c.biases, c.eps, c.norm, c.quant, c.weight_scales,
        c.concat);
    // x and the statistics of the input side: h is recomputed in the backward.
    variable_list saved{c.x, value_or_undefined(c.ln_weight), value_or_undefined(c.ln_bias), mean,
                        rstd};
    saved.insert(saved.end(), c.weights.begin(), c.weights.end());
    ctx->save_for_backward(saved);
    c10::List<bool> has_bias;
    for (const OptTensor& b : c.biases) has_bias.push_back(b.has_value());
    ctx->saved_data["norm"] = std::string(c.norm);
    ctx->saved_data["quant"] = std::string(c.quant);
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["concat"] = c.concat;
    ctx->mark_non_differentiable({mean, rstd});
    // An output without a gradient stays undefined: the backward op skips its GEMMs.
    ctx->set_materialize_grads(false);
    outs.push_back(mean);
    outs.push_back(rstd);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &ln_weight = saved[1], &ln_bias = saved[2];
    const std::vector<Tensor> weights(saved.begin() + 5, saved.end());
    const c10::List<bool> has_bias = ctx->saved_data["has_bias"].toBoolList();
    const size_t n = weights.size();
    // The edges, in the order of the forward's inputs (see the top).
    std::vector<int> edge{0};
    int next = 1;
    edge.push_back(ln_weight.defined() ? next++ : -1);
    edge.push_back(ln_bias.defined() ? next++ : -1);
    for (size_t i = 0; i < n; ++i) edge.push_back(next++);
    for (size_t i = 0; i < n; ++i) edge.push_back(has_bias.get(i) ? next++ : -1);
    c10::List<bool> mask;
    bool any = false;
    for (int e : edge) {
      mask.push_back(needs_grad(ctx, e));
      any = any || mask.get(mask.size() - 1);
    }
    // With concat, each weight's gradient is its column range of the one output's gradient: a
    // view (row stride Σ out_features_i) that the backward op reads in place.
    const bool concat = ctx->saved_data["concat"].toBool();
    c10::List<OptTensor> grad_outs;
    int64_t begin = 0;
    for (size_t i = 0; i < n; ++i) {
      const int64_t cols = weights[i].size(0);
      const Tensor& g = grads[concat ? 0 : i];
      grad_outs.push_back(optional_of(concat && g.defined() ? g.narrow(-1, begin, cols) : g));
      begin += cols;
    }
    // pack's, x's, ln_weight's and ln_bias's positions, then each weight's and given bias's.
    variable_list result(4 + n);
    if (!any) {
      for (size_t i = 0; i < n; ++i) {
        if (has_bias.get(i)) result.emplace_back();
      }
      return result;
    }
    auto [dx, dln_weight, dln_bias, dweights, dbiases] =
        op_handle<schema::LnLinearGroupBackward, Family>().call(
            grad_outs, x, optional_of(ln_weight), optional_of(ln_bias), weights, saved[3],
            saved[4], ctx->saved_data["norm"].toStringRef(), mask,
            ctx->saved_data["quant"].toStringRef());
    result[1] = wanted(dx, mask.get(0));
    result[2] = wanted(dln_weight, mask.get(1));
    result[3] = wanted(dln_bias, mask.get(2));
    for (size_t i = 0; i < n; ++i) result[4 + i] = wanted(dweights[i], mask.get(3 + i));
    for (size_t i = 0; i < n; ++i) {
      if (has_bias.get(i)) result.push_back(wanted(dbiases[i], mask.get(3 + n + i)));
    }
    return result;
  }
};

template <template <const char*> class Formula, const char* Family>
void impl(torch::Library& m) {
  using Op = typename Formula<Family>::Op;
  m.impl((std::string(Op::kName) + "_" + Family).c_str(),
         TORCH_FN(&AutogradKernel<Formula<Family>>::kernel));
}

template <const char* Family>
void register_family(torch::Library& m) {
  impl<LayerNormFormula, Family>(m);
  impl<AddLayerNormFormula, Family>(m);
  impl<LnLinearFormula, Family>(m);
  impl<DropoutFormula, Family>(m);
  m.impl((std::string(schema::LnLinearGroup::kName) + "_" + Family).c_str(),
         TORCH_FN(&LnLinearGroupAutograd<Family>::kernel));
}

}  // namespace
}  // namespace magneto

TORCH_LIBRARY_IMPL(magneto, Autograd, m) {
  magneto::register_family<magneto::kNative>(m);
  magneto::register_family<magneto::kTriton>(m);
}
