// Kernels that exercise the emulation itself, for tests/test_ops_cuda_emu.py: shuffles with masks
// and widths, the launches it must refuse (a barrier or shuffle in divergent code), and the
// 16-bit conversions and __dp4a. Registered as torch.ops.magneto_emu.* by magneto_kernels._C_emu
// only.
#include <string>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu/cuda_emu.h"

namespace magneto::cuda_emu {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 64;  // two warps
constexpr int kShuffleResults = 5;

// out[k*64 + t]: the k-th shuffle's result in thread t (lane values are lane ids).
__global__ void shuffles(int* out) {
  const int t = static_cast<int>(threadIdx.x), lane = t % 32;
  out[0 * kThreads + t] = __shfl_xor_sync(kFull, lane, 5);
  out[1 * kThreads + t] = __shfl_down_sync(kFull, lane, 3, 16);
  out[2 * kThreads + t] = __shfl_up_sync(kFull, lane, 2, 8);
  out[3 * kThreads + t] = __shfl_sync(kFull, lane, 7, 16);
  // Disjoint half-warp masks at different calls: legal, each half exchanges on its own.
  if (lane < 16) out[4 * kThreads + t] = __shfl_xor_sync(0x0000ffffu, lane, 1);
  else out[4 * kThreads + t] = __shfl_xor_sync(0xffff0000u, lane, 2);
}

__global__ void barrier_in_branch(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void barriers_at_two_sites(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_in_branch(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_outside_mask(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu | (1u << 16), static_cast<int>(threadIdx.x), 1);
}

// Runs one of the kernels above on 64 threads; a launch error raises with the emulation's
// message.
at::Tensor kernel_self_test(std::string_view name) {
  at::Tensor out = at::full({kShuffleResults * kThreads}, -1, at::kInt);
  int* p = out.data_ptr<int>();
  void (*kernel)(int*) = name == "shuffles"                ? shuffles
                         : name == "barrier_in_branch"     ? barrier_in_branch
                         : name == "barriers_at_two_sites" ? barriers_at_two_sites
                         : name == "shuffle_in_branch"     ? shuffle_in_branch
                         : name == "shuffle_outside_mask"  ? shuffle_outside_mask
                                                           : nullptr;
  TORCH_CHECK_VALUE(kernel != nullptr, "no self-test kernel '", name, "'");
  launch_kernel(kernel, 1, kThreads)(p);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

// The bits of the emulated rounding `round` (__float2half_rn or __float2bfloat16_rn) of each
// float32 element, as int32: the tests compare them with torch's own conversions.
template <class Round>
at::Tensor rounded_bits(const at::Tensor& x, Round round) {
  const at::Tensor xc = x.contiguous().to(at::kFloat);
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kInt));
  const float* in = xc.data_ptr<float>();
  int* o = out.data_ptr<int>();
  for (int64_t i = 0; i < xc.numel(); ++i) o[i] = round(in[i]).bits;
  return out;
}

at::Tensor half_bits(const at::Tensor& x) {
  return rounded_bits(x, [](float f) { return __float2half_rn(f); });
}

at::Tensor bfloat16_bits(const at::Tensor& x) {
  return rounded_bits(x, [](float f) { return __float2bfloat16_rn(f); });
}

// The emulated __dp4a of int32 words a, b, c elementwise: the tests compare it with the byte
// products summed in int64 and wrapped to int32.
at::Tensor dp4a(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK_VALUE(a.scalar_type() == at::kInt && b.scalar_type() == at::kInt &&
                        c.scalar_type() == at::kInt && a.sizes() == b.sizes() &&
                        a.sizes() == c.sizes(),
                    "dp4a takes three int32 tensors of one shape");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.contiguous();
  at::Tensor out = at::empty_like(ac);
  for (int64_t i = 0; i < ac.numel(); ++i) {
    out.data_ptr<int>()[i] = __dp4a(ac.data_ptr<int>()[i], bc.data_ptr<int>()[i],
                                    cc.data_ptr<int>()[i]);
  }
  return out;
}

}  // namespace
}  // namespace magneto::cuda_emu

TORCH_LIBRARY(magneto_emu, m) {
  m.def("kernel_self_test(str name) -> Tensor", &magneto::cuda_emu::kernel_self_test);
  m.def("half_bits(Tensor x) -> Tensor", &magneto::cuda_emu::half_bits);
  m.def("bfloat16_bits(Tensor x) -> Tensor", &magneto::cuda_emu::bfloat16_bits);
  m.def("dp4a(Tensor a, Tensor b, Tensor c) -> Tensor", &magneto::cuda_emu::dp4a);
}
