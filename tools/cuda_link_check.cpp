// Host-only smoke test of the CUDA launchers, built by tools/check_cuda.py: it links against the
// compiled csrc/cuda objects (so every launcher declared in kernels.h is defined) and exercises
// the argument checks and empty-size paths, none of which touch a GPU. Exit status 0 = ok.
#include <cstdio>
#include <cstring>

#include "cuda/kernels.h"

namespace {

int failures = 0;

void expect_error(magneto::cuda::Status status, const char* fragment, const char* what) {
  if (status == nullptr || std::strstr(status, fragment) == nullptr) {
    std::printf("FAIL %s: expected an error containing '%s', got '%s'\n", what, fragment,
                status ? status : "(success)");
    ++failures;
  }
}

void expect_ok(magneto::cuda::Status status, const char* what) {
  if (status != nullptr) {
    std::printf("FAIL %s: expected success, got '%s'\n", what, status);
    ++failures;
  }
}

void expect_eq(size_t got, size_t want, const char* what) {
  if (got != want) {
    std::printf("FAIL %s: got %zu, want %zu\n", what, got, want);
    ++failures;
  }
}

}  // namespace

int main() {
  using namespace magneto;
  using namespace magneto::cuda;
  float dummy[4] = {};
  const cudaStream_t stream = nullptr;

  NormForwardParams f;
  f.x = dummy;
  f.x_stride = 4;
  f.y = dummy;
  f.y_stride = 4;
  f.rows = 0;
  f.cols = 4;
  expect_ok(norm_forward(f, stream), "norm_forward with zero rows");
  f.x = f.y = nullptr;  // what an empty tensor's data pointer is
  expect_ok(norm_forward(f, stream), "norm_forward with zero rows and null pointers");
  f.x = f.y = dummy;
  f.rows = 1;
  f.x_stride = 3;
  expect_error(norm_forward(f, stream), "stride", "norm_forward stride < cols");
  f.x_stride = 4;
  f.dtype = static_cast<DType>(7);
  expect_error(norm_forward(f, stream), "dtype", "norm_forward bad dtype");
  f.dtype = DType::kBFloat16;
  f.param_dtype = DType::kFloat16;
  expect_error(norm_forward(f, stream), "param_dtype", "norm_forward bad param dtype");
  f.param_dtype = DType::kFloat32;
  f.norm = Norm::kRms;
  f.beta = dummy;
  expect_error(norm_forward(f, stream), "kRms", "norm_forward rms with beta");
  f.beta = nullptr;
  f.norm = Norm::kNone;
  f.gamma = dummy;
  expect_error(norm_forward(f, stream), "kNone", "norm_forward none with gamma");
  f.gamma = nullptr;
  f.norm = Norm::kLayer;
  f.input_activation = static_cast<Activation>(9);
  expect_error(norm_forward(f, stream), "activation", "norm_forward bad activation");
  f.input_activation = Activation::kNone;
  f.y = nullptr;
  expect_error(norm_forward(f, stream), "required", "norm_forward without y");

  NormBackwardParams b;
  b.rows = 2;
  b.cols = 4;
  b.x_stride = b.dy_stride = 4;
  expect_error(norm_backward(b, stream), "required", "norm_backward without x, dy");
  b.x = b.dy = dummy;
  expect_error(norm_backward(b, stream), "rstd", "norm_backward without statistics");
  b.norm = Norm::kRms;
  b.dbeta = dummy;
  expect_error(norm_backward(b, stream), "kRms", "norm_backward rms dbeta");
  expect_eq(norm_backward_workspace_bytes(100, 64, DType::kFloat32, Activation::kNone, false,
                                          false),
            0, "norm_backward workspace without parameter gradients");
  expect_eq(norm_backward_workspace_bytes(0, 64, DType::kFloat32, Activation::kNone, true, true),
            0, "norm_backward workspace with zero rows");

  LinearEpilogueParams e;
  e.rows = 3;
  e.cols = 8;
  e.product_stride = e.out_stride = 8;
  expect_error(linear_epilogue(e, stream), "required", "linear_epilogue without product");
  e.product = e.out = dummy;
  e.dtype = DType::kBFloat16;
  e.product_dtype = DType::kFloat16;
  expect_error(linear_epilogue(e, stream), "product_dtype", "linear_epilogue bad product dtype");
  e.rows = 0;
  e.product_dtype = DType::kFloat32;
  expect_ok(linear_epilogue(e, stream), "linear_epilogue with zero rows");

  LinearEpilogueBackwardParams l;
  l.rows = 3;
  l.cols = 8;
  l.dy = l.dz = dummy;
  l.dy_stride = l.dz_stride = 8;
  l.activation = Activation::kGelu;
  expect_error(linear_epilogue_backward(l, stream), "preact",
               "linear_epilogue_backward without preact");
  l.rows = 0;
  expect_ok(linear_epilogue_backward(l, stream),
            "linear_epilogue_backward with zero rows, no dbias");
  expect_eq(linear_epilogue_backward_workspace_bytes(0, 8, DType::kFloat32, true), 0,
            "linear_epilogue_backward workspace with zero rows");

  if (failures == 0) std::printf("cuda_link_check: ok\n");
  return failures == 0 ? 0 : 1;
}
