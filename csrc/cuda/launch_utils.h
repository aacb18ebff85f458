// Torch-side helpers of the CUDA orchestration files (csrc/cuda/norm.cpp, ln_linear.cpp): the
// stream a launch goes on, a launcher's Status as a torch error, and the float32 workspace of the
// deterministic column reductions.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#include "tensor_utils.h"

namespace magneto::cuda {

inline void check_status(Status status) { TORCH_CHECK(status == nullptr, status); }

inline cudaStream_t current_stream(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

// The float32 partial sums of the column reductions (bytes: a *_workspace_bytes result, a
// multiple of 4); NaN-poisoned in tests like every buffer, so a partial row a kernel fails to
// write shows up in the gradient instead of reading stale memory.
inline Tensor workspace(const Tensor& x, size_t bytes) {
  return new_tensor({static_cast<int64_t>((bytes + 3) / 4)}, x.options().dtype(at::kFloat));
}

}  // namespace magneto::cuda
