#include "cpu/gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <ctime>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

#include "cpu/kernels.h"
#include "tensor_utils.h"

namespace magneto::cpu::gemm {

using at::Tensor;

namespace {

enum class Engine { kAten, kOneDnn, kFewRows, kWidened };
constexpr Engine kEngines[] = {Engine::kAten, Engine::kOneDnn, Engine::kFewRows, Engine::kWidened};

const char* engine_name(Engine engine) {
  switch (engine) {
    case Engine::kAten: return "aten";
    case Engine::kOneDnn: return "onednn";
    case Engine::kFewRows: return "few-row kernel";
    case Engine::kWidened: return "aten in float32";
  }
  return "?";
}

const char* role_name(Role role) {
  switch (role) {
    case Role::kForward: return "forward";
    case Role::kInputGrad: return "input gradient";
    case Role::kWeightGrad: return "weight gradient";
  }
  return "?";
}

// (role, dtype, log2 of M, N and K rounded up, threads, into a given output): what one
// measurement stands for. A GEMM into a given output (a column range of a gated MLP's
// [gate | up], a workspace block) costs oneDNN a copy that a new tensor does not.
using Key = std::tuple<Role, at::ScalarType, int, int, int, int, bool>;

int log2_ceil(int64_t n) {
  int bits = 0;
  while ((int64_t{1} << bits) < n) ++bits;
  return bits;
}

struct State {
  std::mutex mutex;
  std::string policy;
  bool hide_onednn = false;
  std::map<Key, Engine> chosen;
  State() {
    const char* env = std::getenv("MAGNETO_CPU_GEMM");
    policy = env != nullptr ? env : "auto";
  }
};

State& state() {
  static State s;
  return s;
}

void check_policy(const std::string& policy) {
  TORCH_CHECK(policy == "auto" || policy == "aten" || policy == "onednn" ||
                  policy == "few_rows" || policy == "widened",
              "MAGNETO_CPU_GEMM must be 'auto', 'aten', 'onednn', 'few_rows' or 'widened', got '",
              policy, "'");
}

// torch's oneDNN linear, y = x W^T + b, looked up once by its schema name; none when torch has
// no such operator or oneDNN is switched off (torch.backends.mkldnn.enabled = False).
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> handle =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!handle.has_value() || state().hide_onednn || !at::globalContext().userEnabledMkldnn()) {
    return nullptr;
  }
  return &*handle;
}

// Boxed, so that a change of the operator's C++ signature between torch releases is an error
// this file catches (falling back to aten) rather than a crash.
Tensor onednn_linear(const c10::OperatorHandle& op, const Tensor& x, const Tensor& weight,
                     const std::optional<Tensor>& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

// Whether the few-row kernel can run x @ weight^T + bias: 1-16 rows on a build that has it, one
// dtype for all three.
bool few_rows_fit(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const auto dtype = x.scalar_type();
  return x.size(0) > 0 && x.size(0) <= linear_few_rows_max() && weight.scalar_type() == dtype &&
         (!bias.has_value() || bias->scalar_type() == dtype);
}

// Into out where given (unit column stride), else into a new tensor.
Tensor few_rows_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const Tensor& out) {
  const int64_t rows = x.size(0);
  Tensor y = out.defined() ? out : new_tensor({rows, weight.size(0)}, x.options());
  LinearFewRows a;
  a.dtype = dtype_code(x.scalar_type());
  a.rows = rows;
  a.in_features = weight.size(1);
  a.out_features = weight.size(0);
  a.x = x.data_ptr();
  a.x_stride = x.stride(0);
  a.weight = weight.data_ptr();
  a.weight_stride = weight.stride(0);
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.y_stride = y.stride(0);
  linear_few_rows(a);
  return y;
}

// One GEMM of the engine: the linear or the matmul, into result, or a new tensor where result is
// undefined.
struct Gemm {
  const Tensor& a;
  const Tensor& b;  // the linear's weight (out x in), or the matmul's right operand
  const std::optional<Tensor>& bias;
  bool is_linear;
  bool few_rows;  // a linear the few-row kernel can run

  bool can_run(Engine engine, const c10::OperatorHandle* op) const {
    switch (engine) {
      case Engine::kAten: return true;
      case Engine::kOneDnn: return op != nullptr;
      case Engine::kFewRows: return few_rows;
      case Engine::kWidened:
        return a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
    }
    return false;
  }

  Tensor run(Engine engine, const c10::OperatorHandle* op, const Tensor& result,
             bool accumulate) const {
    if (engine == Engine::kWidened) return run_widened(result, accumulate);
    if (is_linear) {
      if (engine == Engine::kFewRows) return few_rows_linear(a, b, bias, result);
      if (engine == Engine::kOneDnn) {
        const Tensor y = onednn_linear(*op, a, b, bias);
        return result.defined() ? result.copy_(y) : y;
      }
      if (!result.defined()) {
        return bias.has_value() ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
      }
      Tensor y = result;
      return bias.has_value() ? at::addmm_out(y, *bias, a, b.t()) : at::mm_out(y, a, b.t());
    }
    if (!result.defined()) {  // a new tensor: the engine's own output
      return engine == Engine::kOneDnn ? onednn_linear(*op, a, b.t(), std::nullopt) : at::mm(a, b);
    }
    if (engine == Engine::kOneDnn) {
      const Tensor product = onednn_linear(*op, a, b.t(), std::nullopt);
      accumulate ? result.add_(product) : result.copy_(product);
    } else if (accumulate) {
      result.addmm_(a, b);
    } else {
      at::mm_out(const_cast<Tensor&>(result), a, b);
    }
    return result;
  }

  // bf16/fp16 operands widened to float32 (exactly) and torch's fp32 GEMM, whose float32 sum
  // is rounded once into the result, as the native reduced-precision GEMM's is. Where a CPU has
  // no bf16/fp16 arithmetic (AVX2), torch's own GEMM in those dtypes is a generic loop several
  // times slower than its float32 one; the copies are O(MK + KN) against the GEMM's O(MNK).
  Tensor run_widened(const Tensor& result, bool accumulate) const {
    const Tensor a32 = a.to(at::kFloat);
    const Tensor b32 = b.to(at::kFloat);
    Tensor product;
    if (is_linear) {
      product = bias.has_value() ? at::addmm(bias->to(at::kFloat), a32, b32.t())
                                 : at::mm(a32, b32.t());
    } else {
      product = at::mm(a32, b32);
    }
    if (!result.defined()) return product.to(a.scalar_type());
    accumulate ? result.add_(product) : result.copy_(product);
    return result;
  }
};

double cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// The fastest engine for g, timed on its own operands into a scratch output of result's layout
// (so that result is written once, by the engine chosen, and each engine's cost of writing
// there, oneDNN's copy included, is counted; none for a new tensor): three alternating rounds,
// the minimum of each, in the process's CPU time, which other processes on a loaded machine
// disturb far less than wall time. An engine over twice the best after a round cannot win and
// is not run again (torch's bf16 GEMM on an AVX2 CPU takes seconds at training sizes). Another
// engine must beat aten by 5%: within that they are level and torch's default stays. An engine
// that fails (oneDNN throws where it refuses a dtype on this CPU) drops out.
Engine measure(const Gemm& g, const c10::OperatorHandle* op, const Tensor& result) {
  const Tensor scratch = result.defined()
      ? at::empty_strided(result.sizes(), result.strides(), result.options())
      : Tensor();
  std::array<double, std::size(kEngines)> best;
  best.fill(std::numeric_limits<double>::infinity());
  std::array<bool, std::size(kEngines)> dropped{};  // failed, or too slow to win
  for (int round = 0; round < 3; ++round) {
    for (Engine engine : kEngines) {
      const int i = static_cast<int>(engine);
      if (!g.can_run(engine, op) || dropped[i]) continue;
      const double start = cpu_seconds();
      try {
        g.run(engine, op, scratch, false);
      } catch (const std::exception&) {
        dropped[i] = true;
        continue;
      }
      best[i] = std::min(best[i], cpu_seconds() - start);
    }
    const double fastest = *std::min_element(best.begin(), best.end());
    for (size_t i = 0; i < best.size(); ++i) dropped[i] = dropped[i] || best[i] > 2 * fastest;
  }
  Engine chosen = Engine::kAten;
  for (Engine engine : kEngines) {
    const int i = static_cast<int>(engine);
    if (engine != Engine::kAten && best[i] < 0.95 * best[0] &&
        best[i] < best[static_cast<int>(chosen)]) {
      chosen = engine;
    }
  }
  return chosen;
}

Tensor dispatch(Role role, const Gemm& g, const Tensor& result, bool accumulate, int64_t m,
                int64_t n, int64_t k) {
  State& s = state();
  const c10::OperatorHandle* op = onednn_linear_op();
  const at::ScalarType dtype = g.a.scalar_type();
  Engine engine = Engine::kAten;
  const bool choice = op != nullptr || g.few_rows || g.can_run(Engine::kWidened, op);
  if (choice && m > 0 && n > 0 && k > 0) {
    std::lock_guard<std::mutex> lock(s.mutex);
    check_policy(s.policy);
    if (s.policy == "onednn") {
      engine = Engine::kOneDnn;
    } else if (s.policy == "few_rows") {
      engine = g.few_rows ? Engine::kFewRows : Engine::kAten;
    } else if (s.policy == "widened") {
      engine = Engine::kWidened;
    } else if (s.policy == "auto" && g.few_rows && dtype == at::kFloat) {
      // The few-row kernel streams the weight once, prefetched, where MKL packs it first. In
      // fp32 it runs unmeasured: level or faster than MKL on every CPU and row count measured
      // with the weight coming from memory, as a decoding step's does, which a first-use
      // measurement (the weight then in cache) does not see. In bf16/fp16 it is a candidate of
      // the measurement (docs/design.md, Decisions).
      engine = Engine::kFewRows;
    } else if (s.policy == "auto") {
      const Key key{role, dtype, log2_ceil(m), log2_ceil(n), log2_ceil(k), at::get_num_threads(),
                    result.defined()};
      auto it = s.chosen.find(key);
      if (it == s.chosen.end()) it = s.chosen.emplace(key, measure(g, op, result)).first;
      engine = it->second;
    }
  }
  if (engine != Engine::kAten && g.can_run(engine, op)) {
    try {
      return g.run(engine, op, result, accumulate);
    } catch (const std::exception&) {  // pinned to onednn, which refuses this dtype: aten
    }
  }
  return g.run(Engine::kAten, op, result, accumulate);
}

}  // namespace

std::string engine() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  std::string name = at::hasMKL() ? "aten (mkl)" : "aten";
  name += onednn_linear_op() != nullptr ? " + onednn (mkldnn::_linear_pointwise)"
                                        : "; onednn unavailable";
  name += "; policy " + s.policy;
  name += "; bf16/fp16 also in float32 on widened operands";
  const int64_t few = linear_few_rows_max();
  if (few > 0) {
    name += "; linear at 1-" + std::to_string(few) +
            " rows: magneto few-row kernel (fp32; bf16/fp16 where measured faster)";
  }
  for (const auto& [key, engine] : s.chosen) {
    const auto& [role, dtype, m, n, k, threads, into] = key;
    name += "; " + std::string(role_name(role)) + " " + c10::toString(dtype) + " M<=" +
            std::to_string(int64_t{1} << m) + " N<=" + std::to_string(int64_t{1} << n) +
            " K<=" + std::to_string(int64_t{1} << k) + " " + std::to_string(threads) + "t" +
            (into ? " into a given output" : "") + ": " + engine_name(engine);
  }
  return name;
}

void set_policy(const std::string& policy, bool hide_onednn) {
  check_policy(policy);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.policy = policy;
  s.hide_onednn = hide_onednn;
  s.chosen.clear();
}

Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
              const Tensor& out) {
  const Gemm g{x, weight, bias, true, few_rows_fit(x, weight, bias)};
  return dispatch(Role::kForward, g, out, false, x.size(0), weight.size(0), weight.size(1));
}

Tensor matmul(Role role, const Tensor& a, const Tensor& b, const Tensor& result,
              bool accumulate) {
  static const std::optional<Tensor> no_bias;
  TORCH_CHECK(result.defined() || !accumulate, "gemm::matmul: accumulating needs a result");
  return dispatch(role, Gemm{a, b, no_bias, false, false}, result, accumulate, a.size(0),
                  b.size(1), a.size(1));
}

}  // namespace magneto::cpu::gemm
