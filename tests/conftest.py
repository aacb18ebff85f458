"""The interpreter default and the gpu marker; the shared test helpers (tolerances, the
float64-reference comparison, inputs, backends and cases) are in tests/harness.py, the small
models and configs of the module tests in tests/models.py, process groups in tests/gloo.py.

Triton kernels run on CPU tensors in the interpreter, which must be switched on before any
kernel module is imported, hence the environment default below.
"""

import importlib.util
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# OpenMP threads that finish a parallel region sleep at once instead of spinning (libgomp's
# default spins for a while): the suite runs one xdist worker per core, each with torch's
# threads, and the tests run small ops with Python between them, so spinning threads would take
# the cores from the other worker (docs/design.md, Decisions). Thread counts, and so the parallel
# paths tested, are unchanged. Set before torch is imported (libgomp reads it when loaded); the
# workers and the processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# torchscale imports timm.models.layers.drop_path; where no timm is installed the labelled
# stand-in in magneto/compat/timm_standin provides it (by path: importing magneto here would
# import the kernels before the tests set their environment).
TIMM_STANDIN = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "magneto", "compat", "timm_standin"
)
if importlib.util.find_spec("timm") is None:
    sys.path.insert(0, TIMM_STANDIN)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line(
        "markers",
        "repeats_path: its branches are taken by other cases of its test (tests/harness.py); "
        "the newest-Triton stage of make test leaves it out",
    )


def pytest_collection_modifyitems(config, items):
    # The long single tests (marked slow: the compiler runs over all kernels, the 2^31-element
    # norm) first, the rest in collection order: `make test`'s xdist workers (--dist worksteal)
    # start them at once and share out the short tests meanwhile, instead of ending on one alone.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fused_calls(monkeypatch):
    """The Hugging Face integration tests' count of fused calls (tests/transformers_models.py;
    imported here only when a test asks, since it imports transformers)."""
    from transformers_models import FusedCalls

    return FusedCalls(monkeypatch)
