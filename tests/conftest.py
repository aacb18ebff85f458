"""Shared test helpers: float64-reference comparisons, non-zero-mean inputs, GPU marker.

Triton kernels run on CPU tensors in the interpreter, which must be switched on before any
kernel module is imported, hence the environment default below.
"""
import importlib.util
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

# torchscale imports timm.models.layers.drop_path; where no timm is installed the labelled
# stand-in in magneto/compat/timm_standin provides it (by path: importing magneto here would
# import the kernels before the tests set their environment).
TIMM_STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "magneto", "compat", "timm_standin")
if importlib.util.find_spec("timm") is None:
    sys.path.insert(0, TIMM_STANDIN)

import pytest  # noqa: E402
import torch  # noqa: E402

# DESIGN.md §4: ‖out − ref‖ ≤ rtol·‖ref‖ + atol against a float64 reference.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def assert_close(out, ref, rtol, atol=1e-6, name="output"):
    """Norm-wise closeness; NaN/inf never pass and a zero reference never turns into NaN."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - ref).norm().item()
    bound = rtol * ref.norm().item() + atol
    rel = err / max(ref.norm().item(), 1e-300)
    assert err <= bound, f"{name}: ‖out-ref‖ = {err:.3e} > {bound:.3e} (relative {rel:.3e})"


def assert_close_to_reference(out, ref64, same_dtype, name, dtype=None, atol=1e-6):
    """The sharper check (DESIGN.md §4): ``‖out − ref64‖`` within ``RTOL[dtype]·‖ref64‖`` or
    within twice PyTorch's own same-dtype error ``‖same_dtype − ref64‖``, plus ``atol``.

    ``dtype`` is the dtype the op ran in (default: out's). NaN never passes. Returns the
    relative error, for reports.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == same_dtype.dtype, f"{name}: dtype {out.dtype} != {same_dtype.dtype}"
    rtol = RTOL[dtype or out.dtype]
    out, ref64, same_dtype = (t.detach().double().cpu() for t in (out, ref64, same_dtype))
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - ref64).norm().item()
    torch_err = (same_dtype - ref64).norm().item()
    ref_norm = ref64.norm().item()
    bound = max(rtol * ref_norm, 2.0 * torch_err) + atol
    assert err <= bound, (f"{name}: ‖out-ref‖ = {err:.3e} > {bound:.3e} (torch's own error "
                          f"{torch_err:.3e}, ‖ref‖ = {ref_norm:.3e})")
    return err / max(ref_norm, 1e-300)


# Tests that take their inputs from randn() run on this device: MAGNETO_TEST_DEVICE=cuda with
# TRITON_INTERPRET=0 runs e.g. tests/test_triton_ops.py's CPU cases on a GPU (bench/gpu_check.sh).
TEST_DEVICE = os.environ.get("MAGNETO_TEST_DEVICE", "cpu")


def randn(*shape, dtype=torch.float32, mean=0.0, std=1.0, device=None, generator=None):
    """Fresh random normal values (optionally shifted: non-zero-mean rows are the hard case),
    drawn on the CPU (reproducible with ``generator``) and moved to ``device`` (default
    ``TEST_DEVICE``)."""
    t = torch.randn(*shape, dtype=torch.float64, generator=generator) * std + mean
    return t.to(device=device or TEST_DEVICE, dtype=dtype)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
