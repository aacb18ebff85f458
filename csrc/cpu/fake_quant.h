// BitNet's quantisation steps in ATen, as transformers computes them (magneto_kernels/quant.py):
// the cpu backend's online mode (fake-quantised weight and h) and its offline codes of rows
// whose max|h| is given (tensor parallelism: the max over every shard of the row).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace magneto::cpu {

using at::Tensor;

// transformers' WeightQuant: t/s_w in W's dtype, s_w = 1 / mean|W| (float32); mean|W| the given
// weight_scale when there is one (the whole weight's, under tensor parallelism).
inline Tensor fake_quant_weight(const Tensor& weight,
                                const std::optional<Tensor>& weight_scale = std::nullopt) {
  const Tensor w = weight.to(at::kFloat);
  const Tensor absmean = weight_scale.has_value() ? *weight_scale : w.abs().mean();
  const Tensor s = absmean.clamp_min(1e-5).reciprocal();
  return ((w * s).round().clamp(-1, 1) / s).to(weight.scalar_type());
}

// transformers' ActQuant on rows of h: q/s in h's dtype, s = 127 / max|h_row| (float32), into
// h itself when `in_place`, else into a new tensor (h is then x, which is not ours to write).
// row_amax (defined): max|h_row| given, the max over every shard of the row.
inline Tensor fake_quant_rows(const Tensor& h, bool in_place, const Tensor& row_amax = Tensor()) {
  const Tensor f = h.to(at::kFloat);
  const Tensor amax =
      row_amax.defined() ? row_amax.unsqueeze(-1) : f.abs().amax(-1, /*keepdim=*/true);
  const Tensor s = 127.0 / amax.clamp_min(1e-5);
  const Tensor fake = (f * s).round().clamp(-128, 127) / s;
  return in_place ? h.copy_(fake) : fake.to(h.scalar_type());
}

// quantize_rows (kernels.h) with max|h_row| given (row_amax, the max over every shard): its
// float32 steps, s = 127 / max(amax, eps) and the codes round(h·s) clamped, in ATen.
inline void quantize_rows_given(const Tensor& h, const Tensor& row_amax, const Tensor& q,
                                const Tensor& q_sum, const Tensor& scale) {
  const Tensor s = at::full_like(row_amax, 127.0f).div_(row_amax.clamp_min(1e-5));
  const Tensor codes = (h.to(at::kFloat) * s.unsqueeze(-1)).round().clamp(-128, 127);
  q.copy_(codes);
  q_sum.copy_(codes.sum(-1));
  scale.copy_(s);
}

}  // namespace magneto::cpu
