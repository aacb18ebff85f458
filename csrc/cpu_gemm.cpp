#include "cpu_gemm.h"

#include <dlfcn.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <mutex>

namespace magneto::cpu_gemm {
namespace {

using at::Tensor;

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta·result + alpha·mat1@mat2.
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

// Why oneDNN cannot run here (empty when it can). Found once: the symbol, then one small matmul
// against at::mm, which also catches CPUs that mkldnn_matmul refuses (it wants AVX-512 BW/VL/DQ
// or AVX-NE-CONVERT even for fp32).
const std::string& onednn_unusable_reason(MkldnnMatmul* fn) {
  static MkldnnMatmul found = nullptr;
  static const std::string reason = [] {
    auto sym = reinterpret_cast<MkldnnMatmul>(dlsym(RTLD_DEFAULT, kMkldnnMatmulSymbol));
    if (sym == nullptr) return std::string("torch does not export at::native::mkldnn_matmul");
    try {
      const Tensor a = at::arange(24, at::kFloat).reshape({4, 6}) / 7;
      const Tensor b = at::arange(18, at::kFloat).reshape({6, 3}) / 5;
      Tensor c = at::ones({4, 3}, at::kFloat);
      sym(a, b, c, 1.0f, 1.0f);
      if (!at::allclose(c, at::mm(a, b) + 1)) return std::string("mkldnn_matmul gave a wrong result");
    } catch (const std::exception& e) {
      return std::string("mkldnn_matmul failed: ") + e.what();
    }
    found = sym;
    return std::string();
  }();
  *fn = found;
  return reason;
}

}  // namespace

void set_engine(const std::string& s) {
  const Choice parsed = parse(s);
  std::lock_guard<std::mutex> lock(mutex);
  choice = parsed;
  choice_set = true;
}

std::string engine() {
  const Choice c = current_choice();
  if (c == Choice::kAten || !at::globalContext().userEnabledMkldnn()) return "aten";
  MkldnnMatmul fn;
  const std::string& reason = onednn_unusable_reason(&fn);
  if (reason.empty()) return "onednn";
  TORCH_CHECK(c == Choice::kAuto, "MAGNETO_CPU_GEMM=onednn but oneDNN is not usable: ", reason);
  return "aten";
}

Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  static const std::optional<c10::OperatorHandle> linear_pointwise =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  const bool degenerate = x.numel() == 0 || weight.numel() == 0;
  if (!degenerate && x.scalar_type() != at::kHalf && linear_pointwise.has_value() &&
      engine() == "onednn") {
    torch::jit::Stack stack{x, weight, bias, std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), std::string("")};
    linear_pointwise->callBoxed(stack);
    return stack[0].toTensor();
  }
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

void matmul(const Tensor& a, const Tensor& b, const Tensor& result, bool accumulate) {
  // Empty operands (a sum over no rows must still write zeros) and fp16 stay with ATen.
  const bool degenerate = a.numel() == 0 || b.numel() == 0 || result.numel() == 0;
  if (!degenerate && a.scalar_type() != at::kHalf && engine() == "onednn") {
    MkldnnMatmul fn;
    onednn_unusable_reason(&fn);
    fn(a, b, result, accumulate ? 1.0f : 0.0f, 1.0f);
    return;
  }
  if (accumulate) {
    result.addmm_(a, b);
  } else {
    at::mm_out(const_cast<Tensor&>(result), a, b);
  }
}

}  // namespace magneto::cpu_gemm
