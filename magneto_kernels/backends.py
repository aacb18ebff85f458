"""Which backends can run an op on a given device, and which one a call gets.

Backends and the op family each runs (``magneto_kernels.library``):

=========== ============================================ ==========
backend     what runs                                    op family
=========== ============================================ ==========
reference   plain PyTorch (``reference.py``), any device —
triton      Triton kernels: CUDA, or CPU under           triton
            ``TRITON_INTERPRET=1`` (set before import)
cpu         C++ kernels of ``magneto_kernels._C``        native
cuda        CUDA C++ kernels of ``magneto_kernels._C``   native
=========== ============================================ ==========

Why each backend has an op family of its own: docs/design.md, Backends and dispatch.

Choice, strongest first: the ``backend=`` argument, the ``MAGNETO_BACKEND`` environment
variable, then the fastest available for the device (the interpreter is never chosen by default:
it is for checking kernels, not for speed). float64 inputs always go to ``reference``.

``MAGNETO_CUDA_EMULATE=1`` (set before import) makes ``cuda`` run its kernels compiled for the
CPU (``magneto_kernels._C_emu``) on CPU tensors, in place of the ``cpu`` backend: a test
vehicle, never chosen by default.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")
ENV_VAR = "MAGNETO_BACKEND"
FAMILY = {"triton": "triton", "cpu": "native", "cuda": "native"}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def _import_extension():
    """magneto_kernels._C and None, or None and why it cannot be imported. Importing it registers
    the native family's kernels, every family's Autograd kernels (csrc/autograd.cpp) and the
    typed calls ops.py makes: every backend but the reference needs it."""
    try:
        from magneto_kernels import _C
    except ImportError as err:
        if "MAGNETO_CPU_ISA" in str(err):  # built, but asked for an unknown instruction set
            raise
        return None, (
            "the C++ extension magneto_kernels._C is not built "
            f"(pip install --no-build-isolation -e .): {err}"
        )
    return _C, None


EXTENSION, _EXTENSION_PROBLEM = _import_extension()


@functools.lru_cache(maxsize=None)
def _triton_problem(device_type: str) -> Optional[str]:
    try:
        from magneto_kernels import triton as triton_kernels
    except ImportError as err:
        return f"triton is not importable ({err})"
    if _EXTENSION_PROBLEM is not None:
        return _EXTENSION_PROBLEM
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if device_type == "cpu":
        if triton_kernels.INTERPRET:
            return None
        return (
            "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
            "before importing magneto_kernels"
        )
    return f"no Triton kernels for device type {device_type!r}"


@functools.lru_cache(maxsize=None)
def _cpp_problem(device_type: str) -> Optional[str]:
    if _EXTENSION_PROBLEM is not None:
        return _EXTENSION_PROBLEM
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not EXTENSION.with_cuda():
            return "magneto_kernels._C was built without CUDA kernels"
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    return f"no C++ kernels for device type {device_type!r}"


EMULATED_CUDA = os.environ.get("MAGNETO_CUDA_EMULATE") == "1"


def _emulated_problem(backend: str, device_type: str) -> Optional[str]:
    """_problem for cpu and cuda under MAGNETO_CUDA_EMULATE=1: the native family's CPU kernels
    are then the emulated CUDA ones (csrc/cuda_emu)."""
    if device_type != "cpu":
        return "MAGNETO_CUDA_EMULATE=1: the emulated cuda backend takes CPU tensors only"
    if backend == "cpu":
        return "MAGNETO_CUDA_EMULATE=1: CPU tensors run the emulated CUDA kernels instead"
    return _cpp_problem("cpu")


@torch.compiler.assume_constant_result
def _problem(backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` cannot run on ``device_type`` tensors, or None when it can. Constant for
    a process, so torch.compile evaluates it once while tracing instead of tracing into it."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_problem(device_type)
    if EMULATED_CUDA:
        return _emulated_problem(backend, device_type)
    if backend != device_type:
        return f"backend {backend!r} runs on {backend} tensors, not {device_type}"
    return _cpp_problem(device_type)


def available_backends(device: Union[str, torch.device] = "cpu") -> dict[str, Optional[str]]:
    """Every backend name mapped to None when it can run on ``device``, else to the reason why
    not."""
    device_type = torch.device(device).type
    return {name: _problem(name, device_type) for name in BACKENDS}


_RESOLVED: dict[tuple, str] = {}
"""(request, device, dtype) -> backend, for the requests that resolved: what can run where is
constant for a process (``_problem``), so a request resolves the same way every time."""


def resolve_backend(backend: Optional[str], x: torch.Tensor) -> str:
    """The backend a call on ``x`` runs on; ValueError if the requested one cannot run there.
    torch.compile traces the full choice (once); otherwise it is ``cached_backend``'s."""
    if torch.compiler.is_compiling():
        from_env = backend is None
        return _resolve(os.environ.get(ENV_VAR) or None if from_env else backend, from_env, x)
    return cached_backend(backend, x)


def cached_backend(backend: Optional[str], x: torch.Tensor) -> str:
    """resolve_backend outside torch.compile, on every op call: a request seen before is one dict
    lookup, and the messages naming where a request came from are built only when one is
    raised."""
    from_env = backend is None
    if from_env:
        backend = os.environ.get(ENV_VAR) or None
    try:
        key = (backend, x.device, x.dtype)
    except AttributeError:
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}") from None
    try:
        resolved = _RESOLVED.get(key)
    except TypeError:  # an unhashable request: _resolve says what is wrong with it
        return _resolve(backend, from_env, x)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(backend, from_env, x)
    return resolved


def _resolve(backend: Optional[str], from_env: bool, x: torch.Tensor) -> str:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{_source(from_env)} must be one of {BACKENDS} or unset, got {backend!r}")
    device_type = x.device.type
    if x.dtype not in KERNEL_DTYPES:
        if backend not in (None, "reference"):
            raise ValueError(
                f"backend {backend!r} supports dtypes {KERNEL_DTYPES}, got {x.dtype}; "
                "use backend='reference' for float64"
            )
        return "reference"
    if backend is not None:
        problem = _problem(backend, device_type)
        if problem is not None:
            raise ValueError(
                f"backend {backend!r} (from {_source(from_env)}) cannot run on "
                f"{x.device}: {problem}"
            )
        return backend
    for name in _DEFAULT_ORDER.get(device_type, ("reference",)):
        if _problem(name, device_type) is None:
            return name
    return "reference"


def _source(from_env: bool) -> str:
    return f"the {ENV_VAR} environment variable" if from_env else "the backend argument"
