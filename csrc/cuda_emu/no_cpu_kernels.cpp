// The emulated build (magneto_kernels._C_emu) runs every tensor through the CUDA kernels; csrc/
// api.cpp still names the CPU ops, so they are defined here as errors instead of compiling the
// CPU kernels a second time (their signatures are checked against csrc/cpu/ops.h).
#include "cpu/kernels.h"
#include "cpu/ops.h"

namespace magneto::cpu {
namespace {

[[noreturn]] void unavailable() {
  TORCH_CHECK(false, "magneto_kernels._C_emu runs the emulated CUDA kernels only; the C++ CPU "
                     "kernels are in magneto_kernels._C (unset MAGNETO_CUDA_EMULATE)");
  __builtin_unreachable();
}

}  // namespace

void run_norm_forward(const Tensor&, const OptTensor&, double, const OptTensor&, const OptTensor&,
                      double, Norm, Activation, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&) {
  unavailable();
}

void run_norm_backward(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                       const Tensor&, const Tensor&, const OptTensor&, Norm, Activation,
                       const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  unavailable();
}

std::tuple<Tensor, Tensor> run_ln_linear(const Tensor&, const OptTensor&, const OptTensor&,
                                         const Tensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, double, Norm, Activation, Activation,
                                         double, double, const Tensor&, const Tensor&) {
  unavailable();
}

Tensor run_ln_linear_backward(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                              const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const OptTensor&, Norm, Activation, Activation, double, Tensor,
                              const Tensor&, const Tensor&, Tensor, Tensor) {
  unavailable();
}

// The CPU GEMM engine (csrc/cpu/gemm.cpp, which the emulated CUDA orchestration uses) keeps
// torch's GEMM at every size here.
int64_t linear_few_rows_max() { return 0; }
void linear_few_rows(const LinearFewRows&) { unavailable(); }

const char* capability() { return "none"; }

// No CPU kernel builds to choose among here: MAGNETO_CPU_ISA concerns magneto_kernels._C.
std::vector<std::string> supported_isas() { return {}; }
IsaSelection select_isa(const char*) { return {}; }

}  // namespace magneto::cpu
