"""Shared test helpers: float64-reference comparisons, non-zero-mean inputs, GPU marker.

Triton kernels run on CPU tensors in the interpreter, which must be switched on before any
kernel module is imported, hence the environment default below.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

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


def randn(*shape, dtype=torch.float32, mean=0.0, std=1.0, device="cpu", generator=None):
    """Fresh random normal values (optionally shifted: non-zero-mean rows are the hard case)."""
    t = torch.randn(*shape, dtype=torch.float64, generator=generator) * std + mean
    return t.to(device=device, dtype=dtype)


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
