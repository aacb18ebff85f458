// The op families' schemas (magneto_kernels/library.py, SCHEMAS) as C++ calls them. Per op: the
// function type the dispatcher calls its kernels with (Signature), and a struct that names the
// same arguments in the same order, brace-initialised from them. The native family's kernels
// (csrc/ops.h), every family's Autograd kernels (csrc/autograd.cpp) and the typed calls
// (csrc/module.cpp) are written against these structs, not against argument lists.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace magneto {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace schema {

struct LayerNorm {
  static constexpr const char* kName = "layer_norm";
  using Signature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                        const OptTensor&, double,
                                                        std::string_view);
  const Tensor& x;
  const OptTensor& weight;
  const OptTensor& bias;
  double eps;
  std::string_view norm;
};

// input_activation and row_means serve the sharded norm (magneto/parallel): the norm of
// in_act(x), and the row means of g and g·xhat over every shard instead of this row's own.
struct LayerNormBackward {
  static constexpr const char* kName = "layer_norm_backward";
  using Signature = std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
      const Tensor&, const OptTensor&, std::string_view, const c10::List<bool>&,
      std::string_view, const OptTensor&);
  const Tensor& grad_y;
  const Tensor& x;
  const OptTensor& weight;
  const OptTensor& bias;
  const Tensor& mean;
  const Tensor& rstd;
  const OptTensor& grad_accum;
  std::string_view norm;
  const c10::List<bool>& output_mask;
  std::string_view input_activation;
  const OptTensor& row_means;
};

// The sharded norm's first pass: this shard's per-row (mean, M2) of in_act(x).
struct NormStats {
  static constexpr const char* kName = "norm_stats";
  using Signature = std::tuple<Tensor, Tensor>(const Tensor&, std::string_view, std::string_view);
  const Tensor& x;
  std::string_view norm;
  std::string_view input_activation;
};

struct AddLayerNorm {
  static constexpr const char* kName = "add_layer_norm";
  using Signature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double, double,
      std::string_view);
  const Tensor& x;
  const Tensor& residual;
  const OptTensor& weight;
  const OptTensor& bias;
  double eps;
  double alpha;
  std::string_view norm;
};

struct LnLinear {
  static constexpr const char* kName = "ln_linear";
  using Signature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, double, std::string_view, std::string_view,
      std::string_view, double, double, std::string_view, const OptTensor&, const OptTensor&,
      const OptTensor&, const OptTensor&);
  const Tensor& x;
  const OptTensor& ln_weight;
  const OptTensor& ln_bias;
  const Tensor& weight;
  const OptTensor& bias;
  const OptTensor& residual;
  const OptTensor& seed;
  double eps;
  std::string_view norm;
  std::string_view input_activation;
  std::string_view activation;
  double alpha;
  double dropout_p;
  std::string_view quant;
  const OptTensor& weight_scale;
  // The row statistics to normalise with (the sharded norm's, reduced over every shard) instead
  // of the op's own.
  const OptTensor& mean;
  const OptTensor& rstd;
  // The quantised modes' per-row max|h| over every shard (tensor parallelism) instead of the
  // row's own.
  const OptTensor& row_amax;
};

struct LnLinearBackward {
  static constexpr const char* kName = "ln_linear_backward";
  template <class R>
  using Returning = R(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                      std::string_view, std::string_view, std::string_view, double,
                      const c10::List<bool>&, std::string_view, const OptTensor&,
                      const OptTensor&);
  using Signature = Returning<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>>;
  const Tensor& grad_out;
  const Tensor& x;
  const OptTensor& ln_weight;
  const OptTensor& ln_bias;
  const Tensor& weight;
  const Tensor& mean;
  const Tensor& rstd;
  const Tensor& preact;
  const OptTensor& seed;
  std::string_view norm;
  std::string_view input_activation;
  std::string_view activation;
  double dropout_p;
  const c10::List<bool>& output_mask;
  std::string_view quant;
  // bitnet_online under tensor parallelism: the whole weight's mean|W| and h's per-row max over
  // every shard, as the forward was given them.
  const OptTensor& weight_scale;
  const OptTensor& row_amax;
};

// ln_linear_backward's first half for the sharded norm: its arguments, output_mask (dh and
// row_sums, dweight, dbias); returns (dh, row_sums, dweight, dbias).
struct LnLinearBackwardPartial : LnLinearBackward {
  static constexpr const char* kName = "ln_linear_backward_partial";
  using Signature = Returning<std::tuple<Tensor, Tensor, Tensor, Tensor>>;
};

// One output, so the dispatcher calls it with a Tensor, not a tuple.
struct Dropout {
  static constexpr const char* kName = "dropout";
  using Signature = Tensor(const Tensor&, const Tensor&, double);
  const Tensor& x;
  const Tensor& seed;
  double p;
};

// ln_linear with one norm for several weights (q/k/v, gate/up): one output per weight, or with
// concat one output holding them side by side (*, Σ out_features_i). quant as ln_linear's, the
// row quantised once for every weight; weight_scales (n,) the offline modes' scale of each weight.
struct LnLinearGroup {
  static constexpr const char* kName = "ln_linear_group";
  using Signature = std::tuple<std::vector<Tensor>, Tensor, Tensor>(
      const Tensor&, const OptTensor&, const OptTensor&, at::TensorList,
      const c10::List<OptTensor>&, double, std::string_view, std::string_view, const OptTensor&,
      bool);
  const Tensor& x;
  const OptTensor& ln_weight;
  const OptTensor& ln_bias;
  at::TensorList weights;
  const c10::List<OptTensor>& biases;
  double eps;
  std::string_view norm;
  std::string_view quant;
  const OptTensor& weight_scales;
  bool concat;
};

// grad_outs[i] may be a column range of a wider tensor (the concat output's gradient): read with
// its row stride, not copied. output_mask: dx, dln_weight, dln_bias, then one entry per weight for dweights, then one per
// weight for dbiases.
struct LnLinearGroupBackward {
  static constexpr const char* kName = "ln_linear_group_backward";
  using Signature = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>>(
      const c10::List<OptTensor>&, const Tensor&, const OptTensor&, const OptTensor&,
      at::TensorList, const Tensor&, const Tensor&, std::string_view, const c10::List<bool>&,
      std::string_view);
  const c10::List<OptTensor>& grad_outs;
  const Tensor& x;
  const OptTensor& ln_weight;
  const OptTensor& ln_bias;
  at::TensorList weights;
  const Tensor& mean;
  const Tensor& rstd;
  std::string_view norm;
  const c10::List<bool>& output_mask;
  std::string_view quant;
};

}  // namespace schema

// The op families (the values of magneto_kernels.backends.FAMILY; tests/test_codes.py checks
// that the two lists agree): every op is defined once per family as magneto::<op>_<family>.
inline constexpr char kNative[] = "native";
inline constexpr char kTriton[] = "triton";

// magneto::<Op>_<Family>'s typed dispatcher handle, looked up on first use (library.py defines
// the ops when imported, before any call). A call through it dispatches exactly as
// torch.ops.magneto.<op>_<family> does (Autograd key, then the device's kernel), without boxing
// the arguments.
template <class Op, const char* Family>
const c10::TypedOperatorHandle<typename Op::Signature>& op_handle() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow((std::string("magneto::") + Op::kName + "_" + Family).c_str(), "")
          .template typed<typename Op::Signature>();
  return handle;
}

// The function a dispatch key's kernel of Op is: the schema's arguments gathered into Op for
// Impl. Kernel<schema::LnLinear>::call<&impl> has exactly the signature the dispatcher expects.
template <class Op, class Signature = typename Op::Signature>
struct Kernel;
template <class Op, class R, class... A>
struct Kernel<Op, R(A...)> {
  template <R (*Impl)(const Op&)>
  static R call(A... args) {
    return Impl(Op{args...});
  }
};

}  // namespace magneto
