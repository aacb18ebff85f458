// magneto_kernels._C_emu, the Python module of the emulated build: importing it registers the
// CUDA kernels, built for the CPU, at the CPU dispatch key (csrc/register.cpp) and the
// emulation's self-test ops (self_test.cpp). magneto_kernels._C imports it under
// MAGNETO_CUDA_EMULATE=1.
#include <torch/python.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "magneto's CUDA kernels built for the CPU (csrc/cuda_emu); a test vehicle.";
}
