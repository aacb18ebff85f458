// The native family's argument checks (checks.h). The order of the checks, and so which error a
// call with several bad arguments gets, is magneto_kernels/checks.py's.
#include "checks.h"

#include <charconv>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace magneto {

// ------------------------------------------------------------------ values as Python prints them

std::string py_shape(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

namespace {

// repr(float(v)): the shortest digits that read back as v, in fixed notation for decimal
// exponents -4..15 (with at least one digit after the point), else as d.ddde±XX.
std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific).ptr;
  const std::string s(buf, end);  // [-]d[.ddd]e±XX
  const size_t e = s.find('e');
  const bool negative = s[0] == '-';
  std::string digits = s.substr(negative ? 1 : 0, e - (negative ? 1 : 0));
  if (digits.size() > 1) digits.erase(1, 1);  // the point
  const int exp = std::stoi(s.substr(e + 1));
  std::string out;
  if (exp >= 16 || exp < -4) {
    const int mag = exp < 0 ? -exp : exp;
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "") + "e" +
          (exp < 0 ? "-" : "+") + (mag < 10 ? "0" : "") + std::to_string(mag);
  } else if (exp < 0) {
    out = "0." + std::string(-exp - 1, '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exp + 1) {
    out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
  }
  return (negative ? "-" : "") + out;
}

// ------------------------------------------------------------------------------------ names

// The names of a common.h table, quoted and joined: "'a', 'b', 'c'", or with `last` before the
// final one ("'a', 'b' or 'c'"); `skip` is left out.
template <typename Code, size_t N>
std::string quoted_names(const NameCode<Code> (&table)[N], const char* last,
                         std::optional<Code> skip = std::nullopt) {
  std::vector<std::string> names;
  for (const auto& entry : table) {
    if (entry.code != skip) names.push_back(std::string("'") + entry.name + "'");
  }
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += i + 1 == names.size() ? last : ", ";
    out += names[i];
  }
  return out;
}

template <typename Code, size_t N>
std::optional<Code> find_code(const NameCode<Code> (&table)[N], std::string_view name) {
  for (const auto& entry : table) {
    if (name == entry.name) return entry.code;
  }
  return std::nullopt;
}

// layer_norm and add_layer_norm normalise (allow_none false); ln_linear's norm may be "none".
Norm parse_norm(std::string_view name, bool allow_none) {
  const std::optional<Norm> norm = find_code(kNorms, name);
  if (norm.has_value() && (allow_none || *norm != Norm::kNone)) return *norm;
  const std::optional<Norm> skip = allow_none ? std::nullopt : std::optional(Norm::kNone);
  TORCH_CHECK_VALUE(false, "norm must be ", quoted_names(kNorms, " or ", skip), ", got '", name,
                    "'");
  return Norm::kLayer;
}

Activation parse_activation(std::string_view name) {
  const std::optional<Activation> activation = find_code(kActivations, name);
  if (activation.has_value()) return *activation;
  TORCH_CHECK_VALUE(false, "activation must be one of ", quoted_names(kActivations, ", "),
                    ", got '", name, "'");
  return Activation::kNone;
}

// ln_linear's input activation: a plain one or a gated one (common.h).
Activation parse_input_activation(std::string_view name) {
  std::optional<Activation> activation = find_code(kActivations, name);
  if (!activation.has_value()) activation = find_code(kGatedActivations, name);
  if (activation.has_value()) return *activation;
  TORCH_CHECK_VALUE(false, "input_activation must be one of ", quoted_names(kActivations, ", "),
                    ", ", quoted_names(kGatedActivations, ", "), ", got '", name, "'");
  return Activation::kNone;
}

Quant parse_quant(std::string_view name) {
  const std::optional<Quant> quant = find_code(kQuants, name);
  if (quant.has_value()) return *quant;
  TORCH_CHECK_VALUE(false, "quant must be one of ", quoted_names(kQuants, ", "), ", got '", name,
                    "'");
  return Quant::kNone;
}

// ---------------------------------------------------------------------------------- tensors

// x, (*, features): what every other tensor is checked against.
void check_input(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0,
                    "x must have a non-empty last dimension, got shape ", py_shape(x.sizes()));
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                        x.scalar_type() == at::kHalf,
                    "x must have dtype torch.float32, torch.bfloat16 or torch.float16, got ",
                    py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(),
                    "x must be on a CPU or CUDA device, got ", x.device());
}

// A tensor on x's device with this shape and dtype (x's when dtype is not given).
void check_like(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef shape,
                std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", py_shape(shape), ", got ",
                    py_shape(t.sizes()));
  if (dtype.has_value()) {
    TORCH_CHECK_VALUE(t.scalar_type() == *dtype, name, " must have dtype ", py_dtype(*dtype),
                      ", got ", py_dtype(t.scalar_type()));
  } else {
    TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ",
                      py_dtype(x.scalar_type()), ", got ", py_dtype(t.scalar_type()));
  }
}

// A norm parameter: (cols,), x's dtype or float32, on x's device.
void check_param(const OptTensor& t, const char* name, const Tensor& x, int64_t cols) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == cols, name, " must have shape (", cols,
                    ",), got ", py_shape(t->sizes()));
  if (x.scalar_type() == at::kFloat) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, name, " must have dtype torch.float32, got ",
                      py_dtype(t->scalar_type()));
  } else {
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat,
                      name, " must have x's dtype ", py_dtype(x.scalar_type()),
                      " or torch.float32, got ", py_dtype(t->scalar_type()));
  }
}

// gamma, beta: the norm's parameters, named in errors as the public API names them.
void check_norm_params(const OptTensor& gamma, const OptTensor& beta, Norm norm, const Tensor& x,
                       const char* gamma_name, const char* beta_name, int64_t cols) {
  check_param(gamma, gamma_name, x, cols);
  check_param(beta, beta_name, x, cols);
  TORCH_CHECK_VALUE(!(beta.has_value() && norm == Norm::kRms), beta_name,
                    " must be None for norm='rms' (RMSNorm has no bias)");
  TORCH_CHECK_VALUE(!(beta.has_value() && !gamma.has_value()), beta_name, " given without ",
                    gamma_name);
  TORCH_CHECK_VALUE(!(gamma.has_value() && norm == Norm::kNone), gamma_name,
                    " must be None for norm='none'");
}

// Saved statistics: float32 (rows,) where the norm has them, anything where it does not.
void check_stats(const Tensor& mean, const Tensor& rstd, Norm norm, const Tensor& x) {
  const int64_t rows = x.numel() / x.size(-1);
  if (norm == Norm::kLayer) check_like(mean, "mean", x, {rows}, at::kFloat);
  if (norm != Norm::kNone) check_like(rstd, "rstd", x, {rows}, at::kFloat);
}

// weight_scale, as a float32 (1,) tensor: the offline modes' stored scale (required), the
// online mode's whole weight's mean|W| (optional: tensor parallelism), None without quant.
OptTensor check_weight_scale(const OptTensor& weight_scale, Quant quant, std::string_view name,
                             const Tensor& x) {
  if (quant == Quant::kNone) {
    TORCH_CHECK_VALUE(!weight_scale.has_value(), "weight_scale must be None for quant='", name,
                      "'");
    return std::nullopt;
  }
  TORCH_CHECK_VALUE(quant == Quant::kBitnetOnline || weight_scale.has_value(), "quant='", name,
                    "' needs weight_scale, a tensor of shape (1,)");
  check_param(weight_scale, "weight_scale", x, 1);
  if (!weight_scale.has_value()) return std::nullopt;
  return weight_scale->to(at::kFloat).contiguous();
}

// row_amax: the quantised modes' per-row max|h| over every shard, (rows,) float32.
void check_row_amax(const OptTensor& row_amax, Quant quant, const Tensor& x) {
  if (!row_amax.has_value()) return;
  TORCH_CHECK_VALUE(quant != Quant::kNone, "row_amax needs quant (BitNet's quantised modes)");
  check_like(*row_amax, "row_amax", x, {x.numel() / x.size(-1)}, at::kFloat);
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", py_float(eps));
}

// The dropout seed, a 0-d int64 tensor on x's device, when dropout_p > 0.
void check_dropout(const OptTensor& seed, double p, const Tensor& x) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", py_float(p));
  if (p == 0.0) return;
  TORCH_CHECK_VALUE(seed.has_value(), "seed must be given when dropout_p > 0");
  check_like(*seed, "seed", x, {}, at::kLong);
}

// The width of ln_linear's norm and GEMM operand h = N(in_act(x)): x's, or half of it for a
// gated input activation (x = [gate | up]).
int64_t in_features_of(const Tensor& x, Activation input_activation, std::string_view name) {
  const int64_t features = x.size(-1);
  if (!is_gated(input_activation)) return features;
  TORCH_CHECK_VALUE(features % 2 == 0, "input_activation='", name,
                    "' needs x = [gate | up] with an even last dimension, got shape ",
                    py_shape(x.sizes()));
  return features / 2;
}

// The offline modes' packed weight (common.h's layout): (out_features, in_features / 4) uint8.
void check_packed_weight(const Tensor& weight, const Tensor& x, int64_t in_features,
                         std::string_view quant, const char* name = "weight") {
  TORCH_CHECK_VALUE(in_features % kQuantPackUnit == 0, "quant='", quant,
                    "' needs in_features a multiple of ", kQuantPackUnit, ", got ", in_features);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == in_features / 4, name,
                    " must have shape (out_features, ", in_features / 4,
                    ") for quant='", quant, "' (packed: magneto_kernels.quant.pack), got ",
                    py_shape(weight.sizes()));
  check_like(weight, name, x, weight.sizes(), at::kByte);
}

void check_weight(const Tensor& weight, const Tensor& x, int64_t in_features) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == in_features,
                    "weight must have shape (out_features, ", in_features, "), got ",
                    py_shape(weight.sizes()));
  check_like(weight, "weight", x, weight.sizes());
}

// x's leading dimensions followed by `features`: the shape of a tensor row-for-row with x.
std::vector<int64_t> rows_shape(const Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  return shape;
}

// The kernels take (rows, features) matrices: a contiguous t viewed as one, here below the
// Autograd key, where a view costs far less than in Python (docs/design.md, Decisions).
Tensor as_rows(const Tensor& t) {
  const Tensor c = t.contiguous();
  if (c.dim() == 2) return c;
  const int64_t cols = c.size(-1);
  return c.view({c.numel() / std::max<int64_t>(cols, 1), cols});
}

// (rows, cols) with unit column stride: a view where t allows one (a column range of a wider
// tensor keeps its row stride), else contiguous.
Tensor as_strided_rows(const Tensor& t) {
  const int64_t cols = t.size(-1);
  if (t.stride(-1) != 1 || cols == 0) return as_rows(t);
  const Tensor r = t.reshape({t.numel() / cols, cols});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

OptTensor as_rows(const OptTensor& t) {
  return t.has_value() ? OptTensor(as_rows(*t)) : std::nullopt;
}

OptTensor contiguous(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

// What ln_linear and its backward share: x, the names, the norm's parameters and the weight.
struct LnLinearCodes {
  Norm norm;
  Activation input_activation, activation;
  Quant quant;
};

template <class Call>
LnLinearCodes check_ln_linear_common(const Call& call) {
  check_input(call.x);
  const LnLinearCodes codes{parse_norm(call.norm, true),
                            parse_input_activation(call.input_activation),
                            parse_activation(call.activation), parse_quant(call.quant)};
  const int64_t in_features =
      in_features_of(call.x, codes.input_activation, call.input_activation);
  check_norm_params(call.ln_weight, call.ln_bias, codes.norm, call.x, "ln_weight", "ln_bias",
                    in_features);
  if (codes.quant != Quant::kNone) {
    TORCH_CHECK_VALUE(codes.norm != Norm::kLayer &&
                          (codes.input_activation == Activation::kNone ||
                           codes.input_activation == Activation::kRelu2Glu) &&
                          codes.activation == Activation::kNone,
                      "quant='", call.quant,
                      "' takes norm='rms' or no norm, input_activation 'none' or 'relu2_glu' and "
                      "no output activation (BitNet's)");
  }
  if (is_offline(codes.quant)) {
    check_packed_weight(call.weight, call.x, in_features, call.quant);
  } else {
    check_weight(call.weight, call.x, in_features);
  }
  return codes;
}

// What ln_linear_group and its backward share: x, the norm and its parameters, the quant mode,
// the weights.
template <class Call>
std::pair<Norm, Quant> check_ln_linear_group_common(const Call& call) {
  check_input(call.x);
  const Norm norm = parse_norm(call.norm, true);
  const Quant quant = parse_quant(call.quant);
  const int64_t in_features = call.x.size(-1);
  check_norm_params(call.ln_weight, call.ln_bias, norm, call.x, "ln_weight", "ln_bias",
                    in_features);
  TORCH_CHECK_VALUE(quant == Quant::kNone || norm != Norm::kLayer, "quant='", call.quant,
                    "' takes norm='rms' or no norm (BitNet's)");
  TORCH_CHECK_VALUE(!call.weights.empty(), "weights is empty");
  for (size_t i = 0; i < call.weights.size(); ++i) {
    const Tensor& w = call.weights[i];
    const std::string name = "weights[" + std::to_string(i) + "]";
    if (is_offline(quant)) {
      check_packed_weight(w, call.x, in_features, call.quant, name.c_str());
      continue;
    }
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == in_features, name,
                      " must have shape (out_features, ", in_features, "), got ",
                      py_shape(w.sizes()));
    check_like(w, name.c_str(), call.x, w.sizes());
  }
  return {norm, quant};
}

// One entry per weight in a list argument (biases, grad_outs).
void check_count(size_t count, const char* name, size_t weights) {
  TORCH_CHECK_VALUE(count == weights, count, " ", name, " for ", weights,
                    " weights (give None for a projection without one)");
}

std::vector<Tensor> contiguous_all(at::TensorList ts) {
  std::vector<Tensor> out;
  out.reserve(ts.size());
  for (const Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace

std::vector<bool> mask_of(const c10::List<bool>& output_mask, size_t n) {
  TORCH_CHECK_VALUE(output_mask.size() == n, "output_mask must have ", n, " entries, got ",
                    output_mask.size());
  std::vector<bool> mask(n);
  for (size_t i = 0; i < n; ++i) mask[i] = output_mask.get(i);
  return mask;
}

Tensor with_rows_of(const Tensor& result, const Tensor& x) {
  if (x.dim() == 2 || result.dim() != 2) return result;
  return result.view(rows_shape(x, result.size(1)));
}

NormArgs parse(const schema::LayerNorm& call) {
  check_input(call.x);
  const Norm norm = parse_norm(call.norm, false);
  check_norm_params(call.weight, call.bias, norm, call.x, "weight", "bias", call.x.size(-1));
  check_eps(call.eps);
  return {as_rows(call.x), std::nullopt, 1.0, contiguous(call.weight), contiguous(call.bias),
          call.eps, norm};
}

NormArgs parse(const schema::AddLayerNorm& call) {
  check_input(call.x);
  const Norm norm = parse_norm(call.norm, false);
  check_like(call.residual, "residual", call.x, call.x.sizes());
  check_norm_params(call.weight, call.bias, norm, call.x, "weight", "bias", call.x.size(-1));
  check_eps(call.eps);
  return {as_rows(call.x), as_rows(call.residual), call.alpha, contiguous(call.weight),
          contiguous(call.bias), call.eps, norm};
}

NormBackwardArgs parse(const schema::LayerNormBackward& call) {
  check_input(call.x);
  const Norm norm = parse_norm(call.norm, false);
  const Activation input_activation = parse_input_activation(call.input_activation);
  const int64_t cols = in_features_of(call.x, input_activation, call.input_activation);
  check_like(call.grad_y, "grad_y", call.x, rows_shape(call.x, cols));
  if (call.grad_accum.has_value()) {
    TORCH_CHECK_VALUE(!is_gated(input_activation),
                      "grad_accum must be None for a gated input_activation");
    check_like(*call.grad_accum, "grad_accum", call.x, call.x.sizes());
  }
  check_norm_params(call.weight, call.bias, norm, call.x, "weight", "bias", cols);
  check_stats(call.mean, call.rstd, norm, call.x);
  if (call.row_means.has_value()) {
    const int64_t rows = call.x.numel() / call.x.size(-1);
    check_like(*call.row_means, "row_means", call.x, {rows, norm == Norm::kLayer ? 2 : 1},
               at::kFloat);
  }
  return {as_rows(call.grad_y),
          as_rows(call.x),
          contiguous(call.weight),
          contiguous(call.bias),
          call.mean.contiguous(),
          call.rstd.contiguous(),
          as_rows(call.grad_accum),
          norm,
          input_activation,
          contiguous(call.row_means)};
}

NormArgs parse(const schema::NormStats& call) {
  check_input(call.x);
  const Norm norm = parse_norm(call.norm, false);
  const Activation input_activation = parse_input_activation(call.input_activation);
  in_features_of(call.x, input_activation, call.input_activation);
  return {as_rows(call.x), std::nullopt, 1.0, std::nullopt, std::nullopt, 0.0, norm,
          input_activation};
}

LnLinearArgs parse(const schema::LnLinear& call) {
  const Tensor& x = call.x;
  const auto [norm, input_activation, activation, quant] = check_ln_linear_common(call);
  const int64_t out_features = call.weight.size(0);
  if (call.bias.has_value()) check_like(*call.bias, "bias", x, {out_features});
  if (call.residual.has_value()) {
    check_like(*call.residual, "residual", x, rows_shape(x, out_features));
  }
  check_dropout(call.seed, call.dropout_p, x);
  check_eps(call.eps);
  if (quant != Quant::kNone) {
    TORCH_CHECK_VALUE(call.dropout_p == 0.0, "quant='", call.quant, "' takes no dropout");
  }
  const OptTensor weight_scale = check_weight_scale(call.weight_scale, quant, call.quant, x);
  TORCH_CHECK_VALUE(call.mean.has_value() == call.rstd.has_value(),
                    "mean and rstd must be given together");
  if (call.rstd.has_value()) {
    TORCH_CHECK_VALUE(norm != Norm::kNone, "mean and rstd need a norm (ln_weight given)");
    check_stats(*call.mean, *call.rstd, norm, x);
  }
  check_row_amax(call.row_amax, quant, x);
  return {as_rows(x),
          contiguous(call.ln_weight),
          contiguous(call.ln_bias),
          call.weight.contiguous(),
          contiguous(call.bias),
          as_rows(call.residual),
          call.seed,
          call.eps,
          norm,
          input_activation,
          activation,
          call.alpha,
          call.dropout_p,
          quant,
          weight_scale,
          contiguous(call.mean),
          contiguous(call.rstd),
          contiguous(call.row_amax)};
}

LnLinearBackwardArgs parse(const schema::LnLinearBackward& call) {
  const Tensor& x = call.x;
  const auto [norm, input_activation, activation, quant] = check_ln_linear_common(call);
  TORCH_CHECK_NOT_IMPLEMENTED(!is_offline(quant), "ln_linear: quant='", call.quant,
                              "' has no backward (inference only); train with "
                              "quant='bitnet_online'");
  const std::vector<int64_t> out_shape = rows_shape(x, call.weight.size(0));
  check_like(call.grad_out, "grad_out", x, out_shape);
  check_stats(call.mean, call.rstd, norm, x);
  if (activation != Activation::kNone) check_like(call.preact, "preact", x, out_shape);
  check_dropout(call.seed, call.dropout_p, x);
  const OptTensor weight_scale = check_weight_scale(call.weight_scale, quant, call.quant, x);
  check_row_amax(call.row_amax, quant, x);
  return {as_rows(call.grad_out),
          as_rows(x),
          contiguous(call.ln_weight),
          contiguous(call.ln_bias),
          call.weight.contiguous(),
          call.mean.contiguous(),
          call.rstd.contiguous(),
          activation != Activation::kNone ? as_rows(call.preact) : call.preact,
          call.seed,
          norm,
          input_activation,
          activation,
          call.dropout_p,
          quant,
          weight_scale,
          contiguous(call.row_amax)};
}

DropoutArgs parse(const schema::Dropout& call) {
  check_input(call.x);
  TORCH_CHECK_VALUE(call.p >= 0.0 && call.p < 1.0, "p must be in [0, 1), got ",
                    py_float(call.p));
  check_like(call.seed, "seed", call.x, {}, at::kLong);
  return {as_rows(call.x), call.seed, call.p};
}

LnLinearGroupArgs parse(const schema::LnLinearGroup& call) {
  const Tensor& x = call.x;
  const auto [norm, quant] = check_ln_linear_group_common(call);
  const size_t n = call.weights.size();
  check_count(call.biases.size(), "biases", n);
  std::vector<OptTensor> biases;
  for (size_t i = 0; i < n; ++i) {
    const OptTensor bias = call.biases.get(i);
    if (bias.has_value()) {
      check_like(*bias, ("biases[" + std::to_string(i) + "]").c_str(), x,
                 {call.weights[i].size(0)});
    }
    biases.push_back(contiguous(bias));
  }
  check_eps(call.eps);
  OptTensor weight_scales;
  if (is_offline(quant)) {
    TORCH_CHECK_VALUE(call.weight_scales.has_value(), "quant='", call.quant,
                      "' needs weight_scales, a tensor of shape (", n, ",): one per weight");
    check_param(call.weight_scales, "weight_scales", x, static_cast<int64_t>(n));
    weight_scales = call.weight_scales->to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK_VALUE(!call.weight_scales.has_value(), "weight_scales must be None for quant='",
                      call.quant, "'");
  }
  return {as_rows(x),
          contiguous(call.ln_weight),
          contiguous(call.ln_bias),
          contiguous_all(call.weights),
          std::move(biases),
          call.eps,
          norm,
          quant,
          weight_scales,
          call.concat};
}

LnLinearGroupBackwardArgs parse(const schema::LnLinearGroupBackward& call) {
  const Tensor& x = call.x;
  const auto [norm, quant] = check_ln_linear_group_common(call);
  TORCH_CHECK_NOT_IMPLEMENTED(!is_offline(quant), "ln_linear_group: quant='", call.quant,
                              "' has no backward (inference only); train with "
                              "quant='bitnet_online'");
  const size_t n = call.weights.size();
  check_count(call.grad_outs.size(), "grad_outs", n);
  std::vector<Tensor> grad_outs;
  for (size_t i = 0; i < n; ++i) {
    const OptTensor grad = call.grad_outs.get(i);
    if (grad.has_value()) {
      check_like(*grad, ("grad_outs[" + std::to_string(i) + "]").c_str(), x,
                 rows_shape(x, call.weights[i].size(0)));
    }
    grad_outs.push_back(grad.has_value() ? as_strided_rows(*grad) : Tensor());
  }
  check_stats(call.mean, call.rstd, norm, x);
  return {std::move(grad_outs), as_rows(x), contiguous(call.ln_weight), contiguous(call.ln_bias),
          contiguous_all(call.weights), call.mean.contiguous(), call.rstd.contiguous(), norm,
          quant};
}

}  // namespace magneto
