// magneto::decode_attention: a decoding step's attention over a key/value cache handed in by the
// caller, fused with the copy of that cache into the room that holds it afterwards
// (magneto/kv_cache.py). Without it the step copies the cache (prev positions, then the new
// ones) and the attention reads the copy again; here each key and value row is read once, written
// to its room, and used while it is in L1: the scores of the few query rows against it (keys), then
// their softmax-weighted sum (values). Per (batch, head), in float32:
//   key_room = [prev_key; key], value_room = [prev_value; value]   (positions, copied as they are)
//   out[t] = softmax_j(q[t]·key_room[j] / √head_dim) · value_room    (every query sees every key)
// out is rounded to the dtype once, as torch's CPU flash attention rounds it. No mask: a decoding
// step of new tokens over their cache; the layer takes the other paths for masked calls.
//
// The arithmetic is plain loops written for the compiler to vectorise (the dot products keep one
// partial sum per lane); the loops are compiled three times, for AVX-512, AVX2 and baseline x86-64
// (GCC's target attribute, as the other kernels' ISA builds), and the build capability() names
// runs, so that MAGNETO_CPU_ISA (tools/with_cpu_isa.sh) selects it as it selects theirs.
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "tensor_utils.h"

namespace magneto::cpu {
namespace {

// A (batch, heads, positions, head_dim) tensor whose rows (head_dim) are contiguous.
template <typename T>
struct Heads {
  T* data;
  int64_t batch_stride, head_stride, position_stride;

  T* row(int64_t b, int64_t h, int64_t p) const {
    return data + b * batch_stride + h * head_stride + p * position_stride;
  }
};

template <typename T>
Heads<T> heads_of(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
struct DecodeAttention {
  int64_t heads, rows, cached, head_dim;  // rows: query rows (= new positions)
  float scale;
  Heads<const T> q, prev_key, prev_value, key, value;
  Heads<T> key_room, value_room, out;
};

// Partial sums per lane: the compiler vectorises this loop without reassociating a single sum.
constexpr int64_t kLanes = 16;

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += q[i + l] * static_cast<float>(k[i + l]);
  }
  for (int64_t l = 0; i < n; ++i, ++l) lanes[l] += q[i] * static_cast<float>(k[i]);
  // halving the lanes: vector adds, not a chain of sixteen scalar ones
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// One (batch, head): `buffer` holds rows × (2·head_dim + cached + rows) floats.
template <typename T>
inline void attend_head(const DecodeAttention<T>& a, int64_t bh, float* buffer) {
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int64_t d = a.head_dim, length = a.cached + a.rows;
  float* q = buffer;                   // rows × d, scaled
  float* acc = q + a.rows * d;         // rows × d
  float* p = acc + a.rows * d;         // rows × length: scores, then probabilities
  for (int64_t t = 0; t < a.rows; ++t) {
    const T* src = a.q.row(b, h, t);
    for (int64_t i = 0; i < d; ++i) q[t * d + i] = static_cast<float>(src[i]) * a.scale;
  }
  for (int64_t j = 0; j < length; ++j) {
    const T* k = j < a.cached ? a.prev_key.row(b, h, j) : a.key.row(b, h, j - a.cached);
    std::memcpy(a.key_room.row(b, h, j), k, d * sizeof(T));
    for (int64_t t = 0; t < a.rows; ++t) p[t * length + j] = dot(q + t * d, k, d);
  }
  for (int64_t t = 0; t < a.rows; ++t) {
    float* s = p + t * length;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < length; ++j) top = std::max(top, s[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < length; ++j) {
      s[j] = std::exp(s[j] - top);
      sum += s[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < length; ++j) s[j] *= inv;
  }
  std::fill(acc, acc + a.rows * d, 0.0f);
  for (int64_t j = 0; j < length; ++j) {
    const T* v = j < a.cached ? a.prev_value.row(b, h, j) : a.value.row(b, h, j - a.cached);
    std::memcpy(a.value_room.row(b, h, j), v, d * sizeof(T));
    for (int64_t t = 0; t < a.rows; ++t) {
      const float w = p[t * length + j];
      float* o = acc + t * d;
      for (int64_t i = 0; i < d; ++i) o[i] += w * static_cast<float>(v[i]);
    }
  }
  for (int64_t t = 0; t < a.rows; ++t) {
    T* dst = a.out.row(b, h, t);
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(acc[t * d + i]);
  }
}

template <typename T>
inline void attend_heads(const DecodeAttention<T>& a, int64_t begin, int64_t end) {
  // uninitialised: attend_head writes every element before it reads it
  const auto buffer = std::make_unique_for_overwrite<float[]>(
      static_cast<size_t>(a.rows * (2 * a.head_dim + a.cached + a.rows)));
  for (int64_t bh = begin; bh < end; ++bh) attend_head(a, bh, buffer.get());
}

// The ISA builds: `flatten` inlines the loops above into each, compiled for its target.
template <typename T>
__attribute__((flatten)) void attend_heads_default(const DecodeAttention<T>& a, int64_t begin,
                                                   int64_t end) {
  attend_heads(a, begin, end);
}

#if MAGNETO_CPU_X86_VARIANTS
template <typename T>
__attribute__((target("avx2,fma,f16c,bmi2"), flatten)) void attend_heads_avx2(
    const DecodeAttention<T>& a, int64_t begin, int64_t end) {
  attend_heads(a, begin, end);
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"), flatten)) void
attend_heads_avx512(const DecodeAttention<T>& a, int64_t begin, int64_t end) {
  attend_heads(a, begin, end);
}
#endif

template <typename T>
void run(const DecodeAttention<T>& a, int64_t batch) {
  auto build = attend_heads_default<T>;
#if MAGNETO_CPU_X86_VARIANTS
  const std::string isa = capability();
  if (isa == "avx512") build = attend_heads_avx512<T>;
  if (isa == "avx2") build = attend_heads_avx2<T>;
#endif
  at::parallel_for(0, batch * a.heads, 1,
                   [&](int64_t begin, int64_t end) { build(a, begin, end); });
}

void check_heads(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t positions) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                  t.size(2) == positions && t.size(3) == q.size(3),
              "decode_attention: ", name, " must have shape (", q.size(0), ", ", q.size(1), ", ",
              positions, ", ", q.size(3), "), got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == q.scalar_type(), "decode_attention: ",
              name, " must be a CPU tensor of q's dtype ", q.scalar_type(), ", got ",
              t.device(), " ", t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "decode_attention: ", name,
              "'s last dimension must be contiguous, got strides ", t.strides());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& prev_key,
                            const at::Tensor& prev_value, const at::Tensor& key,
                            const at::Tensor& value, at::Tensor& key_room,
                            at::Tensor& value_room) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) >= 1 && q.size(3) >= 1,
              "decode_attention: q must be (batch, heads, rows, head_dim) with rows and head_dim "
              ">= 1, got ", q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "decode_attention: dtype must be float32, bfloat16 or float16, got ", dtype);
  const int64_t rows = q.size(2), cached = prev_key.dim() == 4 ? prev_key.size(2) : -1;
  check_heads(q, "q", q, rows);
  check_heads(prev_key, "prev_key", q, cached);
  check_heads(prev_value, "prev_value", q, cached);
  check_heads(key, "key", q, rows);
  check_heads(value, "value", q, rows);
  check_heads(key_room, "key_room", q, cached + rows);
  check_heads(value_room, "value_room", q, cached + rows);
  // (batch, rows, heads, head_dim) in memory: the layer's transpose and reshape back to
  // (batch, rows, heads·head_dim) is then a view
  auto out = new_tensor({q.size(0), rows, q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  auto launch = [&](auto typed) {
    using T = decltype(typed);
    run(DecodeAttention<T>{q.size(1), rows, cached, q.size(3), scale, heads_of<const T>(q),
                           heads_of<const T>(prev_key), heads_of<const T>(prev_value),
                           heads_of<const T>(key), heads_of<const T>(value),
                           heads_of<T>(key_room), heads_of<T>(value_room), heads_of<T>(out)},
        q.size(0));
  };
  if (dtype == at::kFloat) launch(float{});
  if (dtype == at::kBFloat16) launch(c10::BFloat16{});
  if (dtype == at::kHalf) launch(c10::Half{});
  return out;
}

}  // namespace
}  // namespace magneto::cpu

// The schema is magneto_kernels/library.py's; CPU only (CUDA decodes through SDPA's kernels).
TORCH_LIBRARY_IMPL(magneto, CPU, m) {
  m.impl("decode_attention", TORCH_FN(magneto::cpu::decode_attention));
}
