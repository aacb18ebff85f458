// Torch-side helpers of the CUDA backend (csrc/cuda/backend.cpp): the
// stream a launch goes on, a launcher's Status as a torch error, and the float32 workspace of the
// deterministic column reductions.
//
// In the emulated build (MAGNETO_CUDA_EMULATE, csrc/cuda_emu) the tensors are CPU tensors and the
// kernels run on the calling thread: no device to select, one in-order stream.
#pragma once

#ifndef MAGNETO_CUDA_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "cuda/kernels.h"
#include "tensor_utils.h"

namespace magneto::cuda {

inline void check_status(Status status) { TORCH_CHECK(status == nullptr, status); }

#ifdef MAGNETO_CUDA_EMULATE
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

inline cudaStream_t current_stream(const Tensor&) { return nullptr; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}
#endif

// The float32 partial sums of the column reductions (bytes: a *_workspace_bytes result, a
// multiple of 4); NaN-poisoned in tests like every buffer, so a partial row a kernel fails to
// write shows up in the gradient instead of reading stale memory.
inline Tensor workspace(const Tensor& x, size_t bytes) {
  return new_tensor({static_cast<int64_t>((bytes + 3) / 4)}, x.options().dtype(at::kFloat));
}

}  // namespace magneto::cuda
