// magneto_kernels._C, the Python module: importing it registers the native family's kernels
// (csrc/register.cpp) and every family's Autograd kernels (csrc/autograd.cpp); its functions are
// the typed calls of the ops, the tables of common.h for tests, and what the CPU kernels run
// with. With MAGNETO_CUDA_EMULATE=1 it imports magneto_kernels._C_emu, which holds the CPU
// dispatch key then (docs/design.md, Backends and dispatch).
#include <torch/python.h>  // pybind11 with the Tensor type casters

#include <cstdlib>
#include <string>

#include "backend.h"
#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "schema.h"

namespace magneto {
namespace {

// Op of Family called through its typed dispatcher handle: what torch.ops.magneto.<op>_<family>
// does, without boxing the arguments (a few µs of a decode-size call; bench/bench_overhead.py).
template <class Op, const char* Family, class Signature = typename Op::Signature>
struct TypedCall;
template <class Op, const char* Family, class R, class... A>
struct TypedCall<Op, Family, R(A...)> {
  static R call(A... args) { return op_handle<Op, Family>().call(args...); }
};

// call_<op>: the native op's typed call, with torch's error and warning translation and the GIL
// released, as torch.ops has them. magneto_kernels/ops.py calls these for plain tensors outside
// torch.compile.
template <class Op>
void def_typed_call(pybind11::module_& m) {
  m.def((std::string("call_") + Op::kName).c_str(),
        torch::wrap_pybind_function_no_gil(&TypedCall<Op, kNative>::call));
}

pybind11::dict codes() {
  pybind11::dict norms, activations, gated_activations, philox;
  for (const auto& entry : kNorms) norms[entry.name] = static_cast<int>(entry.code);
  for (const auto& entry : kActivations) activations[entry.name] = static_cast<int>(entry.code);
  for (const auto& entry : kGatedActivations) {
    for (const auto& gate : kActivations) {
      if (gate.code == gate_of(entry.code)) gated_activations[entry.name] = gate.name;
    }
  }
  philox["key_a"] = kPhiloxKeyA;
  philox["key_b"] = kPhiloxKeyB;
  philox["round_a"] = kPhiloxRoundA;
  philox["round_b"] = kPhiloxRoundB;
  philox["rounds"] = kPhiloxRounds;
  pybind11::dict out;
  out["norms"] = norms;
  out["activations"] = activations;
  out["gated_activations"] = gated_activations;
  out["philox"] = philox;
  out["families"] = pybind11::make_tuple(kNative, kTriton);
  return out;
}

}  // namespace
}  // namespace magneto

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "magneto's C++ CPU and CUDA kernels; importing registers the magneto::*_native ops.";
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
  m.def("codes", &magneto::codes,
        "csrc/common.h's tables and the op families, for tests to check against "
        "magneto_kernels/codes.py and backends.py: {'norms': {name: code}, 'activations': "
        "{name: code}, 'gated_activations': {name: gate's activation}, 'philox': {constant: "
        "value}, 'families': (name, ...)}.");
  magneto::def_typed_call<magneto::schema::LayerNorm>(m);
  magneto::def_typed_call<magneto::schema::AddLayerNorm>(m);
  magneto::def_typed_call<magneto::schema::LnLinear>(m);
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
