// The native family's kernels (csrc/ops.h) registered per dispatch key, with the backend that
// runs there: the CPU key runs cpu::Kernels, the CUDA key cuda::Kernels (CUDA builds).
//
// The emulated build, magneto_kernels._C_emu (MAGNETO_CUDA_EMULATE, csrc/cuda_emu), compiles this
// file too and registers cuda::Kernels, compiled for the CPU, at the CPU key. With
// MAGNETO_CUDA_EMULATE=1 in the environment, _C leaves that key to _C_emu (csrc/module.cpp imports
// it), so that one extension per process registers it.
#include <memory>
#include <string>

#include <torch/library.h>

#include "ops.h"

namespace magneto {
namespace {

template <class Op, auto Impl>
void impl(torch::Library& m) {
  m.impl((std::string(Op::kName) + "_" + kNative).c_str(),
         TORCH_FN((Kernel<Op>::template call<Impl>)));
}

template <class Backend>
void register_native_family(torch::Library& m) {
  impl<schema::LayerNorm, &ops::layer_norm<Backend>>(m);
  impl<schema::LayerNormBackward, &ops::layer_norm_backward<Backend>>(m);
  impl<schema::NormStats, &ops::norm_stats<Backend>>(m);
  impl<schema::AddLayerNorm, &ops::add_layer_norm<Backend>>(m);
  impl<schema::LnLinear, &ops::ln_linear<Backend>>(m);
  impl<schema::LnLinearBackward, &ops::ln_linear_backward<Backend>>(m);
  impl<schema::LnLinearBackwardPartial, &ops::ln_linear_backward_partial<Backend>>(m);
  impl<schema::Dropout, &ops::dropout<Backend>>(m);
  impl<schema::LnLinearGroup, &ops::ln_linear_group<Backend>>(m);
  impl<schema::LnLinearGroupBackward, &ops::ln_linear_group_backward<Backend>>(m);
}

#ifndef MAGNETO_CUDA_EMULATE
// The CPU key's registration, unless the emulated build takes the key (see the top).
const std::unique_ptr<torch::Library> cpu_registration = [] {
  std::unique_ptr<torch::Library> lib;
  if (cuda_emulation_requested()) return lib;
  lib = std::make_unique<torch::Library>(torch::Library::IMPL, "magneto", c10::DispatchKey::CPU,
                                         __FILE__, __LINE__);
  register_native_family<cpu::Kernels>(*lib);
  return lib;
}();
#endif

}  // namespace
}  // namespace magneto

#ifdef MAGNETO_CUDA_EMULATE
TORCH_LIBRARY_IMPL(magneto, CPU, m) {
  magneto::register_native_family<magneto::cuda::Kernels>(m);
}
#elif defined(MAGNETO_WITH_CUDA)
TORCH_LIBRARY_IMPL(magneto, CUDA, m) {
  magneto::register_native_family<magneto::cuda::Kernels>(m);
}
#endif
