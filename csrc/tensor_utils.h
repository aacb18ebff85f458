// Torch-side helpers shared by the ops (csrc/ops.h) and the backends: the dtype code
// a kernel takes, output allocation (NaN-poisoned in tests) and pointer access to optional
// tensors. Host code only; the kernels never see a Tensor.
#pragma once

#include <atomic>
#include <cmath>
#include <optional>

#include <ATen/ATen.h>

#include "common.h"

namespace magneto {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t);
  }
  return DType::kFloat32;
}

// Tests set this (magneto_kernels._C._set_poison_outputs) to fill every output and intermediate
// buffer with NaN before the kernels write it, so that an element a kernel forgets shows up.
inline std::atomic<bool> poison_outputs{false};

inline Tensor new_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  if (poison_outputs.load(std::memory_order_relaxed)) t.fill_(NAN);
  return t;
}

inline Tensor new_like(const Tensor& t) { return new_tensor(t.sizes(), t.options()); }

// What the op returns for an absent output (a gradient not asked for, no preact, ...).
inline Tensor empty0(const Tensor& x) { return at::empty({0}, x.options()); }

inline float* opt_float_ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr;
}

// A float32 buffer for a gradient the kernels reduce in float32: the output itself when it is
// float32, else a new one that copy_back rounds into the output afterwards.
inline Tensor grad_f32(const Tensor& out) {
  return out.scalar_type() == at::kFloat ? out
                                         : new_tensor(out.sizes(), out.options().dtype(at::kFloat));
}

inline void copy_back(const Tensor& out, const Tensor& f32) {
  if (!out.is_same(f32)) out.copy_(f32);
}

}  // namespace magneto
