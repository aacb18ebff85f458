// The native op family (magneto::<op>_native, schemas in magneto_kernels/library.py) as C++
// calls it: each op's signature and its typed dispatcher handle, looked up on first use. A call
// through a handle dispatches exactly as torch.ops.magneto.<op>_native does (Autograd key, then
// the device's kernel), without boxing the arguments.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace magneto::native_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using LayerNormOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                       const OptTensor&, double,
                                                       c10::string_view);
using LayerNormBackwardOp = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    const Tensor&, const OptTensor&, c10::string_view, const c10::List<bool>&);
using AddLayerNormOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double, double,
    c10::string_view);
using LnLinearOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, double, c10::string_view, c10::string_view,
    c10::string_view, double, double);
using LnLinearBackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, c10::string_view,
    c10::string_view, c10::string_view, double, const c10::List<bool>&);

// magneto::<name>'s handle (library.py defines the schemas when imported, before any call).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

#define MAGNETO_NATIVE_OP(fn, Signature, name)                \
  inline const auto& fn() {                                  \
    static const auto op = find_op<Signature>("magneto::" name); \
    return op;                                               \
  }
MAGNETO_NATIVE_OP(layer_norm_op, LayerNormOp, "layer_norm_native")
MAGNETO_NATIVE_OP(layer_norm_backward_op, LayerNormBackwardOp, "layer_norm_backward_native")
MAGNETO_NATIVE_OP(add_layer_norm_op, AddLayerNormOp, "add_layer_norm_native")
MAGNETO_NATIVE_OP(ln_linear_op, LnLinearOp, "ln_linear_native")
MAGNETO_NATIVE_OP(ln_linear_backward_op, LnLinearBackwardOp, "ln_linear_backward_native")
#undef MAGNETO_NATIVE_OP

}  // namespace magneto::native_ops
