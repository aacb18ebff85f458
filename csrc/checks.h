// The native family's argument checks, in one place: each op's schema arguments (schema.h) parsed
// into what its backend receives (backend.h): names to codes, every tensor checked against x
// (device, shape, dtype; ValueError naming the argument), contiguous, and x and the tensors
// row-for-row with it viewed as (rows, features). The messages are the public API's, word for
// word those of magneto_kernels/checks.py, which checks the same for the other backends
// (tests/test_ops_overhead_semantics.py holds every backend to them).
#pragma once

#include <array>
#include <string>
#include <vector>

#include "backend.h"
#include "schema.h"

namespace magneto {

// Values as Python prints them, for messages word for word those of magneto_kernels/checks.py
// (also the int8 head's, csrc/int8_head.cpp).
std::string py_shape(at::IntArrayRef shape);
std::string py_dtype(at::ScalarType dtype);

NormArgs parse(const schema::LayerNorm& call);
NormArgs parse(const schema::AddLayerNorm& call);
NormBackwardArgs parse(const schema::LayerNormBackward& call);
NormArgs parse(const schema::NormStats& call);
LnLinearArgs parse(const schema::LnLinear& call);
LnLinearBackwardArgs parse(const schema::LnLinearBackward& call);
DropoutArgs parse(const schema::Dropout& call);
LnLinearGroupArgs parse(const schema::LnLinearGroup& call);
LnLinearGroupBackwardArgs parse(const schema::LnLinearGroupBackward& call);

// output_mask, checked to have n entries.
std::vector<bool> mask_of(const c10::List<bool>& output_mask, size_t n);

// output_mask, checked to have N entries.
template <size_t N>
std::array<bool, N> mask_of(const c10::List<bool>& output_mask) {
  TORCH_CHECK_VALUE(output_mask.size() == N, "output_mask must have ", N, " entries, got ",
                    output_mask.size());
  std::array<bool, N> mask{};
  for (size_t i = 0; i < N; ++i) mask[i] = output_mask.get(i);
  return mask;
}

// A (rows, features) result with x's leading dimensions (x as the op was given it); a
// placeholder for an absent output (1-D, empty) as it is.
Tensor with_rows_of(const Tensor& result, const Tensor& x);

}  // namespace magneto
