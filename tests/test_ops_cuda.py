"""What only the CUDA C++ backend (``backend="cuda"``, csrc/cuda) has; tests/test_ops.py runs
the op suite on it (every case there, on a GPU, including the widths that take each kernel path).

On a CPU-only machine only ``test_nvcc_compile_check`` runs: it compiles every csrc/cuda/*.cu
for sm_80 and sm_90a and fails on errors, warnings or register spills (tools/check_cuda.py;
where tests/cuda_compiled.json holds the results of the same inputs it reads them instead, and
``test_nvcc_results_key_covers_the_includes`` checks what that key covers); it is skipped,
saying why, when nvcc is absent. Everything else needs a GPU (``gpu`` marker,
run by bench/gpu_check.sh): the backend is there, the scalar path for misaligned tensors gives
the vector path's bits, and parameter gradients are deterministic.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import BY_NAME, randn

import magneto_kernels as mk
from magneto_kernels.backends import available_backends

ROOT = Path(__file__).resolve().parents[1]
CUDA = BY_NAME["cuda"]


def _load_check_cuda():
    spec = importlib.util.spec_from_file_location("check_cuda", ROOT / "tools" / "check_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nvcc_results_key_covers_the_includes():
    """The key of tools/check_cuda.py's stored results covers every project header a .cu file
    includes, transitively, the link check's source and the tool itself; it changes with
    nvcc's version."""
    check_cuda = _load_check_cuda()
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    keyed = {p.relative_to(ROOT).as_posix() for p in check_cuda.keyed_files(sources)}
    assert {"csrc/cuda/common.cuh", "csrc/cuda/kernels.h", "csrc/common.h"} <= keyed
    assert {p.relative_to(ROOT).as_posix() for p in sources} <= keyed
    assert {"tools/cuda_link_check.cpp", "tools/check_cuda.py"} <= keyed
    build = "Build cuda_13.0.r13.0/compiler.36424714_0"
    assert check_cuda.inputs_key(build, sources) != check_cuda.inputs_key(build + "x", sources)
    assert check_cuda.inputs_key(build, sources) != check_cuda.inputs_key(build, sources[1:])


@pytest.mark.slow
def test_nvcc_compile_check():
    """Every .cu compiles for sm_80 and sm_90a without warnings and without register spills
    (or tests/cuda_compiled.json holds that result for the same inputs)."""
    check_cuda = _load_check_cuda()
    if check_cuda.find_nvcc() is None:
        pytest.skip("nvcc not found (PATH, $NVCC, $CUDA_HOME): the CUDA compile check needs it")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_cuda.py")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "norm_forward_rows" in proc.stdout and "linear_epilogue_kernel" in proc.stdout


# ------------------------------------------------------------------------------------ GPU only


@pytest.fixture(autouse=True)
def poison_outputs(request):
    """NaN-fill outputs and workspaces before the kernels write them (GPU tests only)."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    # Not CUDA.running(), which skips: here a missing CUDA build must fail (the test below).
    restore = CUDA.poison()
    yield
    restore()


@pytest.mark.gpu
def test_cuda_backend_is_available():
    """On a GPU machine a missing CUDA build is a failure, not a reason to test nothing."""
    assert available_backends("cuda")["cuda"] is None, available_backends("cuda")["cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [256, 4096, 40000])
def test_misaligned_tensors_take_the_scalar_path(dtype, width):
    """Views 2 or 4 bytes off a 16-byte boundary give bitwise the vector path's results."""
    rows = 6
    buf = randn(rows * width + 1, dtype=dtype, mean=2.0, device="cuda")
    x_odd = buf[1:].view(rows, width)
    x = x_odd.clone()
    wbuf = randn(width + 1, dtype=dtype, mean=1.0, device="cuda")
    w_odd, w = wbuf[1:], wbuf[1:].clone()
    dy = randn(rows, width, dtype=dtype, device="cuda")
    outs = []
    for xi, wi in ((x, w), (x_odd, w_odd)):
        xi = xi.detach().requires_grad_(True)
        wi = wi.detach().requires_grad_(True)
        y = mk.layer_norm(xi, wi, None, backend="cuda")
        y.backward(dy)
        outs.append((y.detach(), xi.grad, wi.grad))
    for a, b, name in zip(outs[0], outs[1], ("y", "dx", "dweight")):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("width", [768, 20000])
def test_parameter_gradients_are_deterministic(width):
    x = randn(4096 if width < 8192 else 64, width, dtype=torch.bfloat16, mean=1.0, device="cuda")
    w = randn(width, mean=1.0, device="cuda")
    b = randn(width, device="cuda")
    dy = randn(*x.shape, dtype=torch.bfloat16, device="cuda")
    grads = []
    for _ in range(2):
        wi, bi = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        mk.layer_norm(x, wi, bi, backend="cuda").backward(dy)
        grads.append((wi.grad, bi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
