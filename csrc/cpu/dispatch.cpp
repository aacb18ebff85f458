// Run-time choice among the instruction-set builds of the CPU kernels: the widest the CPU
// supports, or the one named by MAGNETO_CPU_ISA ("avx512", "avx2", "default"; for tests and
// benchmarks of the narrower builds). An ISA the CPU lacks is never chosen.
#include <cstdlib>
#include <cstring>

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
  }

MAGNETO_DECLARE_KERNELS(baseline)
#if MAGNETO_CPU_X86_VARIANTS
MAGNETO_DECLARE_KERNELS(avx512)
MAGNETO_DECLARE_KERNELS(avx2)
#endif
#undef MAGNETO_DECLARE_KERNELS

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect() {
#if MAGNETO_CPU_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  Isa best = avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
  if (const char* want = std::getenv("MAGNETO_CPU_ISA")) {
    if (std::strcmp(want, "default") == 0) best = Isa::kBaseline;
    if (std::strcmp(want, "avx2") == 0 && avx2) best = Isa::kAvx2;
  }
  return best;
#else
  return Isa::kBaseline;
#endif
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

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

void residual_bias_init(DType dtype, int64_t rows, int64_t cols, const void* residual,
                        int64_t residual_stride, float alpha, const void* bias, void* out,
                        int64_t out_stride) {
  MAGNETO_DISPATCH(residual_bias_init, dtype, rows, cols, residual, residual_stride, alpha, bias,
                   out, out_stride)
}

const char* capability() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: return "default";
  }
  return "default";
}

}  // namespace magneto::cpu
