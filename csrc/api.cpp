// The API of magneto_kernels._C: checks tensors (shape, dtype, device, contiguity; errors name the
// argument and raise ValueError), allocates outputs, dispatches on x's device to the op
// orchestration of a backend (csrc/cpu/ops.h, csrc/cuda/ops.h) and registers the "native" op
// family (schemas, fake impls and autograd formulas live in magneto_kernels/library.py) for the
// CPU dispatch key and, when built with MAGNETO_WITH_CUDA, for CUDA.
//
// The same file builds magneto_kernels._C_emu (MAGNETO_CUDA_EMULATE, csrc/cuda_emu): the CUDA
// kernels compiled for the CPU, which take the CPU dispatch key and run CPU tensors through
// magneto::cuda. With MAGNETO_CUDA_EMULATE=1 in the environment, _C leaves that key to _C_emu and
// imports it, so that one extension per process registers it.
#include <torch/python.h>  // pybind11 with the Tensor type casters

#include <array>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/ops.h"
#include "native_ops.h"
#include "tensor_utils.h"

#ifdef MAGNETO_WITH_CUDA
#include "cuda/ops.h"
#endif

namespace magneto {
namespace {

// ------------------------------------------------------------------------------ argument checks

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

// The width of ln_linear's norm and GEMM operand h = N(in_act(x)): x's, or half of it for a gated
// input activation (x = [gate | up]).
int64_t in_features_of(const Tensor& x, Activation input_activation) {
  if (!is_gated(input_activation)) return x.size(1);
  TORCH_CHECK_VALUE(x.size(1) % 2 == 0,
                    "a gated input_activation needs x's last dimension to be even ([gate | up]), "
                    "got ",
                    x.size(1));
  return x.size(1) / 2;
}

// x: the row-major input, (*, features), every other argument is checked against.
void check_input(const Tensor& x, const char* name = "x") {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, name,
                    " must have a non-empty features dimension (*, features), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                        x.scalar_type() == at::kHalf,
                    name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), name,
                    " must be on a CPU or CUDA device, got ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), name, " must be contiguous");
}

void check_like(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef shape,
                std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  const at::ScalarType want = dtype.value_or(x.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == want, name, " must have dtype ", want, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// A norm parameter: (cols,), x's dtype or float32, on x's device, contiguous.
void check_param(const OptTensor& t, const char* name, const Tensor& x, int64_t cols) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == cols, name, " must have shape (", cols,
                    ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, name,
                    " must have x's dtype (", x.scalar_type(), ") or float32, got ",
                    t->scalar_type());
  TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
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

// Saved statistics: float32 (rows,) where the norm has them, anything empty where it does not.
void check_stats(const Tensor& mean, const Tensor& rstd, Norm norm, const Tensor& x) {
  const int64_t rows = x.size(0);
  if (norm == Norm::kLayer) check_like(mean, "mean", x, {rows}, at::kFloat);
  if (norm != Norm::kNone) check_like(rstd, "rstd", x, {rows}, at::kFloat);
}

void check_eps(double eps) { TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps); }

// The dropout seed (a 0-d int64 tensor on x's device) when dropout_p > 0.
void check_dropout(const OptTensor& seed, double p, const Tensor& x) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return;
  TORCH_CHECK_VALUE(seed.has_value(), "seed must be given when dropout_p > 0");
  check_like(*seed, "seed", x, {}, at::kLong);
}

void check_linear(const Tensor& x, int64_t in_features, const Tensor& weight,
                  const OptTensor& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == in_features,
                    "weight must have shape (out_features, ", in_features, "), got ",
                    weight.sizes());
  check_like(weight, "weight", x, weight.sizes(), std::nullopt);
  if (bias.has_value()) check_like(*bias, "bias", x, {weight.size(0)}, std::nullopt);
}

// The ops take x, and the tensors shaped like it or like the output, as (*, features), and run
// the backends on (rows, features) matrices: a view in, a view of each output back. In C++ below
// the Autograd key a view costs well under 1 µs; the same two in Python cost ~3 µs each.
Tensor as_rows(const Tensor& t) {
  if (t.dim() == 2) return t;
  const int64_t cols = t.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.view({rows, cols});
}

// x's leading dimensions followed by `features`: the shape of an output row-for-row with x.
std::vector<int64_t> rows_shape(const Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  return shape;
}

// A (rows, features) result with x's leading dimensions; a placeholder for an absent output
// (1-D, empty) as it is.
Tensor with_rows_of(const Tensor& result, const Tensor& x) {
  if (x.dim() == 2 || result.dim() != 2) return result;
  return result.view(rows_shape(x, result.size(1)));
}

std::array<bool, 5> mask_of(const c10::List<bool>& output_mask, size_t n) {
  TORCH_CHECK_VALUE(output_mask.size() == n, "output_mask must have ", n, " entries, got ",
                    output_mask.size());
  std::array<bool, 5> mask{};
  for (size_t i = 0; i < n; ++i) mask[i] = output_mask.get(i);
  return mask;
}

// Whether x runs the C++ CPU kernels (magneto::cpu), else the CUDA kernels (magneto::cuda): by
// device, except in the emulated build, where CPU tensors run the CUDA kernels.
bool runs_cpu_kernels(const Tensor& x) {
#ifdef MAGNETO_CUDA_EMULATE
  (void)x;
  return false;
#else
  return x.is_cpu();
#endif
}

#ifndef MAGNETO_WITH_CUDA
// CUDA tensors reach these ops through the CUDA dispatch key, which only CUDA builds register;
// this guards a CPU-only build's device branch all the same.
[[noreturn]] void no_cuda_kernels() {
  TORCH_CHECK(false, "magneto_kernels._C was built without CUDA kernels");
  __builtin_unreachable();
}
#endif

// ----------------------------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor, Tensor> layer_norm_native(const Tensor& x_in, const OptTensor& weight,
                                                     const OptTensor& bias, double eps,
                                                     c10::string_view norm_name) {
  check_input(x_in);
  const Tensor x = as_rows(x_in);
  const Norm norm = parse_norm(norm_name, false);
  check_norm_params(weight, bias, norm, x, "weight", "bias", x.size(1));
  check_eps(eps);
  Tensor y = new_like(x);
  Tensor mean = stats_tensor(x, norm == Norm::kLayer);
  Tensor rstd = stats_tensor(x, true);
  if (runs_cpu_kernels(x)) {
    cpu::run_norm_forward(x, std::nullopt, 1.0, weight, bias, eps, norm, Activation::kNone, y,
                          Tensor(), mean, rstd);
  } else {
#ifdef MAGNETO_WITH_CUDA
    cuda::run_norm_forward(x, std::nullopt, 1.0, weight, bias, eps, norm, Activation::kNone, y,
                           Tensor(), mean, rstd);
#else
    no_cuda_kernels();
#endif
  }
  return {with_rows_of(y, x_in), mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_native(
    const Tensor& grad_y_in, const Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
    const Tensor& mean, const Tensor& rstd, const OptTensor& grad_accum_in,
    c10::string_view norm_name, const c10::List<bool>& output_mask) {
  check_input(x_in);
  const Norm norm = parse_norm(norm_name, false);
  check_like(grad_y_in, "grad_y", x_in, x_in.sizes(), std::nullopt);
  if (grad_accum_in.has_value()) {
    check_like(*grad_accum_in, "grad_accum", x_in, x_in.sizes(), std::nullopt);
  }
  const Tensor x = as_rows(x_in), grad_y = as_rows(grad_y_in);
  const OptTensor grad_accum =
      grad_accum_in.has_value() ? OptTensor(as_rows(*grad_accum_in)) : std::nullopt;
  check_norm_params(weight, bias, norm, x, "weight", "bias", x.size(1));
  check_stats(mean, rstd, norm, x);
  const auto mask = mask_of(output_mask, 3);
  Tensor dx = mask[0] ? new_like(x) : empty0(x);
  Tensor dgamma = mask[1] && weight.has_value() ? new_like(*weight) : empty0(x);
  Tensor dbeta = mask[2] && bias.has_value() ? new_like(*bias) : empty0(x);
  if (dx.numel() == 0 && dgamma.numel() == 0 && dbeta.numel() == 0) return {dx, dgamma, dbeta};
  if (runs_cpu_kernels(x)) {
    cpu::run_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm,
                           Activation::kNone, dx, dgamma, dbeta, Tensor());
  } else {
#ifdef MAGNETO_WITH_CUDA
    cuda::run_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_accum, norm,
                            Activation::kNone, dx, dgamma, dbeta);
#else
    no_cuda_kernels();
#endif
  }
  return {with_rows_of(dx, x_in), dgamma, dbeta};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_native(
    const Tensor& x_in, const Tensor& residual_in, const OptTensor& weight, const OptTensor& bias,
    double eps, double alpha, c10::string_view norm_name) {
  check_input(x_in);
  const Norm norm = parse_norm(norm_name, false);
  check_like(residual_in, "residual", x_in, x_in.sizes(), std::nullopt);
  const Tensor x = as_rows(x_in), residual = as_rows(residual_in);
  check_norm_params(weight, bias, norm, x, "weight", "bias", x.size(1));
  check_eps(eps);
  Tensor y = new_like(x);
  Tensor sum = new_like(x);
  Tensor mean = stats_tensor(x, norm == Norm::kLayer);
  Tensor rstd = stats_tensor(x, true);
  if (runs_cpu_kernels(x)) {
    cpu::run_norm_forward(x, residual, alpha, weight, bias, eps, norm, Activation::kNone, y, sum,
                          mean, rstd);
  } else {
#ifdef MAGNETO_WITH_CUDA
    cuda::run_norm_forward(x, residual, alpha, weight, bias, eps, norm, Activation::kNone, y,
                           sum, mean, rstd);
#else
    no_cuda_kernels();
#endif
  }
  return {with_rows_of(y, x_in), with_rows_of(sum, x_in), mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ln_linear_native(
    const Tensor& x_in, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& weight,
    const OptTensor& bias, const OptTensor& residual_in, const OptTensor& seed, double eps,
    c10::string_view norm_name, c10::string_view input_activation_name,
    c10::string_view activation_name, double alpha, double dropout_p) {
  check_input(x_in);
  const Tensor x = as_rows(x_in);
  const Norm norm = parse_norm(norm_name, true);
  const Activation input_activation = parse_input_activation(input_activation_name);
  const Activation activation = parse_activation(activation_name);
  const int64_t in_features = in_features_of(x, input_activation);
  check_norm_params(ln_weight, ln_bias, norm, x, "ln_weight", "ln_bias", in_features);
  check_linear(x, in_features, weight, bias);
  OptTensor residual;
  if (residual_in.has_value()) {
    check_like(*residual_in, "residual", x, rows_shape(x_in, weight.size(0)), std::nullopt);
    residual = as_rows(*residual_in);
  }
  check_dropout(seed, dropout_p, x);
  check_eps(eps);
  Tensor mean = stats_tensor(x, norm == Norm::kLayer);
  Tensor rstd = stats_tensor(x, norm != Norm::kNone);
  Tensor out, preact;
  if (runs_cpu_kernels(x)) {
    std::tie(out, preact) =
        cpu::run_ln_linear(x, ln_weight, ln_bias, weight, bias, residual, seed, eps, norm,
                           input_activation, activation, alpha, dropout_p, mean, rstd);
  } else {
#ifdef MAGNETO_WITH_CUDA
    std::tie(out, preact) =
        cuda::run_ln_linear(x, ln_weight, ln_bias, weight, bias, residual, seed, eps, norm,
                            input_activation, activation, alpha, dropout_p, mean, rstd);
#else
    no_cuda_kernels();
#endif
  }
  return {with_rows_of(out, x_in), mean, rstd, with_rows_of(preact, x_in)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_linear_backward_native(
    const Tensor& grad_out_in, const Tensor& x_in, const OptTensor& ln_weight,
    const OptTensor& ln_bias, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
    const Tensor& preact_in, const OptTensor& seed, c10::string_view norm_name,
    c10::string_view input_activation_name, c10::string_view activation_name, double dropout_p,
    const c10::List<bool>& output_mask) {
  check_input(x_in);
  const Tensor x = as_rows(x_in);
  const Norm norm = parse_norm(norm_name, true);
  const Activation input_activation = parse_input_activation(input_activation_name);
  const Activation activation = parse_activation(activation_name);
  const int64_t in_features = in_features_of(x, input_activation);
  check_norm_params(ln_weight, ln_bias, norm, x, "ln_weight", "ln_bias", in_features);
  check_linear(x, in_features, weight, std::nullopt);
  const int64_t out_features = weight.size(0);
  const std::vector<int64_t> out_shape = rows_shape(x_in, out_features);
  check_like(grad_out_in, "grad_out", x, out_shape, std::nullopt);
  const Tensor grad_out = as_rows(grad_out_in);
  check_stats(mean, rstd, norm, x);
  Tensor preact = preact_in;
  if (activation != Activation::kNone) {
    check_like(preact_in, "preact", x, out_shape, std::nullopt);
    preact = as_rows(preact_in);
  }
  check_dropout(seed, dropout_p, x);
  const auto mask = mask_of(output_mask, 5);
  Tensor dx = mask[0] ? new_like(x) : empty0(x);
  Tensor dgamma = mask[1] && ln_weight.has_value() ? new_like(*ln_weight) : empty0(x);
  Tensor dbeta = mask[2] && ln_bias.has_value() ? new_like(*ln_bias) : empty0(x);
  Tensor dweight = mask[3] ? new_like(weight) : empty0(x);
  Tensor dbias = mask[4] ? new_tensor({out_features}, weight.options()) : empty0(x);
  if (runs_cpu_kernels(x)) {
    dx = cpu::run_ln_linear_backward(grad_out, x, ln_weight, ln_bias, weight, mean, rstd, preact,
                                     seed, norm, input_activation, activation, dropout_p, dx,
                                     dgamma, dbeta, dweight, dbias);
  } else {
#ifdef MAGNETO_WITH_CUDA
    dx = cuda::run_ln_linear_backward(grad_out, x, ln_weight, ln_bias, weight, mean, rstd, preact,
                                      seed, norm, input_activation, activation, dropout_p, dx,
                                      dgamma, dbeta, dweight, dbias);
#else
    no_cuda_kernels();
#endif
  }
  return {with_rows_of(dx, x_in), dgamma, dbeta, dweight, dbias};
}

}  // namespace
}  // namespace magneto

// One kernel per op serves both dispatch keys: it branches on x's device.
#define MAGNETO_REGISTER_NATIVE_FAMILY(m)                                                 \
  m.impl("layer_norm_native", TORCH_FN(magneto::layer_norm_native));                     \
  m.impl("layer_norm_backward_native", TORCH_FN(magneto::layer_norm_backward_native));   \
  m.impl("add_layer_norm_native", TORCH_FN(magneto::add_layer_norm_native));             \
  m.impl("ln_linear_native", TORCH_FN(magneto::ln_linear_native));                       \
  m.impl("ln_linear_backward_native", TORCH_FN(magneto::ln_linear_backward_native));

namespace magneto {
namespace {

#ifndef MAGNETO_CUDA_EMULATE
bool cuda_emulation_requested() {
  const char* v = std::getenv("MAGNETO_CUDA_EMULATE");
  return v != nullptr && std::string_view(v) == "1";
}
#endif

// The CPU key's registration, made when this extension owns the key (see the top of the file).
const std::unique_ptr<torch::Library> cpu_registration = [] {
  std::unique_ptr<torch::Library> lib;
#ifndef MAGNETO_CUDA_EMULATE
  if (cuda_emulation_requested()) return lib;
#endif
  lib = std::make_unique<torch::Library>(torch::Library::IMPL, "magneto", c10::DispatchKey::CPU,
                                         __FILE__, __LINE__);
  auto& m = *lib;
  MAGNETO_REGISTER_NATIVE_FAMILY(m)
  return lib;
}();

}  // namespace
}  // namespace magneto

#if defined(MAGNETO_WITH_CUDA) && !defined(MAGNETO_CUDA_EMULATE)
TORCH_LIBRARY_IMPL(magneto, CUDA, m) { MAGNETO_REGISTER_NATIVE_FAMILY(m) }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "magneto's C++ CPU and CUDA kernels; importing registers the magneto::*_native ops.";
#ifndef MAGNETO_CUDA_EMULATE
  if (magneto::cuda_emulation_requested()) {
    try {
      m.attr("emulated_cuda") = pybind11::module_::import("magneto_kernels._C_emu");
    } catch (pybind11::error_already_set& err) {
      throw pybind11::import_error(
          std::string("MAGNETO_CUDA_EMULATE=1 needs magneto_kernels._C_emu, the CUDA kernels "
                      "built for the CPU (MAGNETO_BUILD_CUDA_EMU=1 python3 setup.py build_ext "
                      "--inplace): ") + err.what());
    }
  }
#endif
  m.def("emulated", []() {
#ifdef MAGNETO_CUDA_EMULATE
    return true;
#else
    return false;
#endif
  }, "Whether this is the emulated build: the CUDA kernels run on CPU tensors (csrc/cuda_emu).");
  m.def("with_cuda", []() {
#ifdef MAGNETO_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("_set_poison_outputs", [](bool on) { magneto::poison_outputs = on; },
        "Tests only: fill outputs and buffers with NaN before the kernels write them.");
  m.def("cpu_gemm_engine", []() { return magneto::cpu::gemm::engine(); },
        "What runs the CPU ln_linear's GEMMs: 'aten (mkl)' or 'aten' (see csrc/cpu/gemm.h).");
  m.def("_cpu_gemm",
        [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate) {
          magneto::cpu::gemm::matmul(a, b, out, accumulate);
        },
        "Benchmarks and tests: out = a @ b (or out += a @ b) as the CPU ln_linear runs it.");
  m.def("codes", []() {
    pybind11::dict norms, activations, gated_activations, philox;
    for (const auto& entry : magneto::kNorms) norms[entry.name] = static_cast<int>(entry.code);
    for (const auto& entry : magneto::kActivations) {
      activations[entry.name] = static_cast<int>(entry.code);
    }
    for (const auto& entry : magneto::kGatedActivations) {
      for (const auto& gate : magneto::kActivations) {
        if (gate.code == magneto::gate_of(entry.code)) gated_activations[entry.name] = gate.name;
      }
    }
    philox["key_a"] = magneto::kPhiloxKeyA;
    philox["key_b"] = magneto::kPhiloxKeyB;
    philox["round_a"] = magneto::kPhiloxRoundA;
    philox["round_b"] = magneto::kPhiloxRoundB;
    philox["rounds"] = magneto::kPhiloxRounds;
    pybind11::dict codes;
    codes["norms"] = norms;
    codes["activations"] = activations;
    codes["gated_activations"] = gated_activations;
    codes["philox"] = philox;
    return codes;
  }, "csrc/common.h's tables: {'norms': {name: code}, 'activations': {name: code},"
     " 'gated_activations': {name: gate's activation}, 'philox': {constant: value}}, for tests to check against magneto_kernels/codes.py.");
  // The native ops called through their typed handles: what torch.ops.magneto.<op>_native
  // does, without boxing the arguments (~2-5 µs of a decode-size call;
  // bench/bench_overhead.py), and like it with torch's error and warning translation and the
  // GIL released. magneto_kernels/ops.py calls these for plain tensors outside torch.compile.
  using magneto::native_ops::OptTensor;
  using at::Tensor;
  m.def("call_layer_norm",
        torch::wrap_pybind_function_no_gil([](const Tensor& x, const OptTensor& weight,
                                              const OptTensor& bias, double eps,
                                              const std::string& norm) {
          return magneto::native_ops::layer_norm_op().call(x, weight, bias, eps, norm);
        }));
  m.def("call_add_layer_norm",
        torch::wrap_pybind_function_no_gil([](const Tensor& x, const Tensor& residual,
                                              const OptTensor& weight, const OptTensor& bias,
                                              double eps, double alpha,
                                              const std::string& norm) {
          return magneto::native_ops::add_layer_norm_op().call(x, residual, weight, bias, eps,
                                                               alpha, norm);
        }));
  m.def("call_ln_linear",
        torch::wrap_pybind_function_no_gil(
            [](const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
               const Tensor& weight, const OptTensor& bias, const OptTensor& residual,
               const OptTensor& seed, double eps, const std::string& norm,
               const std::string& input_activation, const std::string& activation, double alpha,
               double dropout_p) {
              return magneto::native_ops::ln_linear_op().call(
                  x, ln_weight, ln_bias, weight, bias, residual, seed, eps, norm,
                  input_activation, activation, alpha, dropout_p);
            }));
  m.def("cpu_capability", []() { return std::string(magneto::cpu::capability()); },
        "The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'default'.");
  m.def("cpu_isas", []() { return magneto::cpu::supported_isas(); },
        "The instruction sets this CPU can run the kernels with, widest first.");

  // MAGNETO_CPU_ISA is read once, here, so that a bad value fails the import with its name
  // instead of the first kernel call, and a fallback is said once.
  const char* isa_request = std::getenv("MAGNETO_CPU_ISA");
  const magneto::cpu::IsaSelection isa = magneto::cpu::select_isa(isa_request);
  if (!isa.valid) {
    throw pybind11::value_error(c10::str("MAGNETO_CPU_ISA must be 'avx512', 'avx2', 'default' or "
                                         "'auto' (or unset: the widest this CPU supports), got '",
                                         isa_request, "'"));
  }
  if (!isa.note.empty()) {
    pybind11::module_::import("warnings").attr("warn")(isa.note,
                                                       pybind11::module_::import("builtins")
                                                           .attr("RuntimeWarning"));
  }
}
