// Run-time choice among the instruction-set builds of the CPU kernels: the widest the CPU
// supports, unless select_isa() (called by the bindings with MAGNETO_CPU_ISA at import) asks for
// a narrower one, so that tests and benchmarks can run every build on one machine. An ISA the
// CPU lacks is never chosen: asking for it falls back to the widest supported build below it.
#include <string>
#include <string_view>

#include <c10/util/Exception.h>

#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace magneto::cpu {

#define MAGNETO_DECLARE_KERNELS(isa)                                                         \
  namespace isa {                                                                            \
  void norm_forward(const NormForward&);                                                     \
  void norm_backward(const NormBackward&);                                                   \
  void linear_epilogue(const LinearEpilogue&);                                               \
  void linear_epilogue_backward(const LinearEpilogueBackward&);                              \
  void residual_bias_init(DType, int64_t, int64_t, const void*, int64_t, float, const void*, \
                          void*, int64_t);                                                   \
  void quantize_rows(const QuantizeRows&);                                                   \
  void quant_linear(const QuantLinear&);                                                     \
  void int8_head(const Int8Head&);                                                           \
  }

MAGNETO_DECLARE_KERNELS(baseline)
#if MAGNETO_CPU_X86_VARIANTS
MAGNETO_DECLARE_KERNELS(avx512)
MAGNETO_DECLARE_KERNELS(avx2)
namespace avx512 {
void linear_few_rows(const LinearFewRows&);
}
namespace avx2 {
void linear_few_rows(const LinearFewRows&);
}
#endif
#undef MAGNETO_DECLARE_KERNELS

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// Widest first; the names are MAGNETO_CPU_ISA's values and capability()'s results.
struct IsaName {
  Isa isa;
  const char* name;
  const char* needs;  // what the CPU must have, for the fallback message
};
constexpr IsaName kIsas[] = {
    {Isa::kAvx512, "avx512", "AVX-512 F, BW, VL and DQ"},
    {Isa::kAvx2, "avx2", "AVX2, FMA, F16C and BMI2"},
    {Isa::kBaseline, "default", "nothing beyond x86-64"},
};

bool cpu_supports(Isa isa) {
#if MAGNETO_CPU_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  switch (isa) {
    case Isa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::kAvx2: return avx2;
    case Isa::kBaseline: return true;
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

Isa widest_supported_from(size_t first) {
  for (size_t i = first; i < std::size(kIsas); ++i) {
    if (cpu_supports(kIsas[i].isa)) return kIsas[i].isa;
  }
  return Isa::kBaseline;
}

Isa& chosen_isa() {
  static Isa chosen = widest_supported_from(0);
  return chosen;
}

Isa isa() { return chosen_isa(); }

}  // namespace

#if MAGNETO_CPU_X86_VARIANTS
#define MAGNETO_DISPATCH(fn, ...)                          \
  switch (isa()) {                                         \
    case Isa::kAvx512: return avx512::fn(__VA_ARGS__);     \
    case Isa::kAvx2: return avx2::fn(__VA_ARGS__);         \
    case Isa::kBaseline: return baseline::fn(__VA_ARGS__); \
  }
#else
#define MAGNETO_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif

void norm_forward(const NormForward& a) { MAGNETO_DISPATCH(norm_forward, a) }
void norm_backward(const NormBackward& a) { MAGNETO_DISPATCH(norm_backward, a) }
void linear_epilogue(const LinearEpilogue& a) { MAGNETO_DISPATCH(linear_epilogue, a) }
void linear_epilogue_backward(const LinearEpilogueBackward& a) {
  MAGNETO_DISPATCH(linear_epilogue_backward, a)
}

// The rows up to which the few-row kernel beats the BLAS: 16 on both builds that have it
// (docs/design.md, Decisions).
int64_t linear_few_rows_max() { return isa() == Isa::kBaseline ? 0 : 16; }

void linear_few_rows(const LinearFewRows& a) {
#if MAGNETO_CPU_X86_VARIANTS
  switch (isa()) {
    case Isa::kAvx512: return avx512::linear_few_rows(a);
    case Isa::kAvx2: return avx2::linear_few_rows(a);
    case Isa::kBaseline: break;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "linear_few_rows: the portable build has no few-row kernel");
}

void quantize_rows(const QuantizeRows& a) { MAGNETO_DISPATCH(quantize_rows, a) }
void quant_linear(const QuantLinear& a) { MAGNETO_DISPATCH(quant_linear, a) }
void int8_head(const Int8Head& a) { MAGNETO_DISPATCH(int8_head, a) }

void residual_bias_init(DType dtype, int64_t rows, int64_t cols, const void* residual,
                        int64_t residual_stride, float alpha, const void* bias, void* out,
                        int64_t out_stride) {
  MAGNETO_DISPATCH(residual_bias_init, dtype, rows, cols, residual, residual_stride, alpha, bias,
                   out, out_stride)
}

const char* capability() {
  for (const IsaName& entry : kIsas) {
    if (entry.isa == isa()) return entry.name;
  }
  return "default";
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const IsaName& entry : kIsas) {
    if (cpu_supports(entry.isa)) names.emplace_back(entry.name);
  }
  return names;
}

IsaSelection select_isa(const char* request) {
  IsaSelection result;
  const std::string_view want = request == nullptr ? "" : request;
  if (want.empty() || want == "auto") {
    chosen_isa() = widest_supported_from(0);
    return result;
  }
  for (size_t i = 0; i < std::size(kIsas); ++i) {
    if (want != kIsas[i].name) continue;
    chosen_isa() = widest_supported_from(i);
    if (chosen_isa() != kIsas[i].isa) {
      result.note = std::string("MAGNETO_CPU_ISA=") + kIsas[i].name + " needs " +
                    kIsas[i].needs + ", which this CPU lacks; the CPU kernels run with " +
                    capability() + " instead";
    }
    return result;
  }
  result.valid = false;
  result.note = "MAGNETO_CPU_ISA must be ";
  for (const IsaName& entry : kIsas) result.note += std::string("'") + entry.name + "', ";
  result.note.resize(result.note.size() - 2);
  result.note += " or 'auto' (or unset: the widest this CPU supports), got '" +
                 std::string(want) + "'";
  return result;
}

}  // namespace magneto::cpu
