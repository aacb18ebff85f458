#include "cpu/gemm.h"

#include <dlfcn.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <mutex>

namespace magneto::cpu::gemm {
namespace {

using at::Tensor;

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha):
// result = beta·result + alpha·mat1@mat2.
using MkldnnMatmul = void (*)(const Tensor&, const Tensor&, const Tensor&, float, float);
constexpr const char* kMkldnnMatmulSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

enum class Choice { kAuto, kOnednn, kAten };

Choice parse(const std::string& s) {
  if (s.empty() || s == "auto") return Choice::kAuto;
  if (s == "onednn") return Choice::kOnednn;
  if (s == "aten") return Choice::kAten;
  TORCH_CHECK_VALUE(false, "MAGNETO_CPU_GEMM must be 'auto', 'onednn' or 'aten', got '", s, "'");
  return Choice::kAuto;
}

std::mutex mutex;
bool choice_set = false;
Choice choice = Choice::kAuto;

Choice current_choice() {
  std::lock_guard<std::mutex> lock(mutex);
  if (!choice_set) {
    const char* env = std::getenv("MAGNETO_CPU_GEMM");
    choice = parse(env ? env : "");
    choice_set = true;
  }
  return choice;
}

// oneDNN's matmul as found once in this process: the symbol, then one small matmul against
// at::mm, which also catches CPUs that mkldnn_matmul refuses (it wants AVX-512 BW/VL/DQ or
// AVX-NE-CONVERT even for fp32). `why_not` is empty when it is usable.
struct Onednn {
  MkldnnMatmul matmul = nullptr;
  std::string why_not;
};

const Onednn& onednn() {
  static const Onednn found = [] {
    Onednn o;
    auto sym = reinterpret_cast<MkldnnMatmul>(dlsym(RTLD_DEFAULT, kMkldnnMatmulSymbol));
    if (sym == nullptr) {
      o.why_not = "torch does not export at::native::mkldnn_matmul";
      return o;
    }
    try {
      const Tensor a = at::arange(24, at::kFloat).reshape({4, 6}) / 7;
      const Tensor b = at::arange(18, at::kFloat).reshape({6, 3}) / 5;
      Tensor c = at::ones({4, 3}, at::kFloat);
      sym(a, b, c, 1.0f, 1.0f);
      if (!at::allclose(c, at::mm(a, b) + 1)) o.why_not = "mkldnn_matmul gave a wrong result";
    } catch (const std::exception& e) {
      o.why_not = std::string("mkldnn_matmul failed: ") + e.what();
    }
    if (o.why_not.empty()) o.matmul = sym;
    return o;
  }();
  return found;
}

// Whether the GEMMs go to oneDNN now (the choice, torch.backends.mkldnn.enabled, usability).
// MKL is Intel's own: on an Intel CPU (Sapphire Rapids, fp32, 1 thread) its at::mm ran
// ln_linear's fwd+bwd 10% (fc1 shape) and 46% (fc2 shape) faster than oneDNN's matmul, and
// the backward's GEMMs alone 1.1-2.4x faster. Elsewhere MKL takes its AVX2 path, and oneDNN was
// ~2x faster on an AMD EPYC with AVX-512.
// Asked once: use_onednn() runs on every GEMM call.
bool cpu_is_intel() {
  static const bool intel = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
#else
    return false;
#endif
  }();
  return intel;
}

bool use_onednn() {
  const Choice c = current_choice();
  if (c == Choice::kAten || !at::globalContext().userEnabledMkldnn()) return false;
  if (c == Choice::kAuto && cpu_is_intel()) return false;
  const Onednn& o = onednn();
  TORCH_CHECK(o.why_not.empty() || c == Choice::kAuto,
              "MAGNETO_CPU_GEMM=onednn but oneDNN is not usable: ", o.why_not);
  return o.why_not.empty();
}

// Shapes and dtypes that stay with ATen: empty operands (a sum over no rows must still write
// zeros) and fp16 (mkldnn_matmul takes it only on CPUs with AVX512-FP16).
bool aten_only(const Tensor& a, const Tensor& b) {
  return a.numel() == 0 || b.numel() == 0 || a.scalar_type() == at::kHalf;
}

}  // namespace

void set_engine(const std::string& s) {
  const Choice parsed = parse(s);
  std::lock_guard<std::mutex> lock(mutex);
  choice = parsed;
  choice_set = true;
}

std::string engine() { return use_onednn() ? "onednn" : "aten"; }

Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  static const std::optional<c10::OperatorHandle> linear_pointwise =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  if (!aten_only(x, weight) && linear_pointwise.has_value() && use_onednn()) {
    torch::jit::Stack stack{x, weight, bias, std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), std::string("")};
    linear_pointwise->callBoxed(stack);
    return stack[0].toTensor();
  }
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

void matmul(const Tensor& a, const Tensor& b, const Tensor& result, bool accumulate) {
  if (!aten_only(a, b) && result.numel() > 0 && use_onednn()) {
    onednn().matmul(a, b, result, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    result.addmm_(a, b);
  } else {
    at::mm_out(const_cast<Tensor&>(result), a, b);
  }
}

}  // namespace magneto::cpu::gemm
