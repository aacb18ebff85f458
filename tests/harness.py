"""What every op test shares: the tolerance table, the float64-reference comparison, the
backends to run and the cases to run them on.

Closeness (docs/design.md, Numerics and tolerances): ``‖out − ref64‖`` against a float64
reference, within ``RTOL[dtype]·‖ref64‖`` or within twice PyTorch's own error in the same dtype
(``‖torch − ref64‖``, the reference module run on the same low-precision inputs), plus ``atol``;
and, element by element, ``max|out − ref64|`` within ``ELEMENT_RTOL_FACTOR·RTOL[dtype]·max|ref64|``
or ``ELEMENT_TORCH_FACTOR`` times PyTorch's own largest element error, plus ``atol`` (a norm-wise
bound alone lets one element of a large output be wrong by O(1)).
NaN and inf never pass; the backends NaN-poison every output buffer before their kernels write.

A backend is one row of ``BACKENDS``; tests/test_ops.py runs every case below on every row.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import magneto_kernels as mk
from magneto_kernels.backends import EMULATED_CUDA, FAMILY, KERNEL_DTYPES, available_backends
from magneto_kernels.codes import ACTIVATIONS, GATED_ACTIVATIONS, NORMS, RTOL

# ---------------------------------------------------------------------------------- tolerances


ATOL = 1e-6
"""Absolute slack of compare_to_reference; parameter gradients (sums over rows) get
``ATOL·sqrt(rows)``."""

DTYPES = KERNEL_DTYPES
"""The dtypes every kernel backend runs in."""

ELEMENT_TORCH_FACTOR = 4.0
"""How many times PyTorch's own largest element error (``max|torch − ref64|``) one element may
err: a kernel rounds in another order than PyTorch, by an ulp or two of the largest values."""

ELEMENT_RTOL_FACTOR = 4.0
"""How many times ``RTOL[dtype]·max|ref64|`` one element may err, where PyTorch's own error is
smaller than that (fp32)."""


def assert_elementwise(err, ref, bound_scale, atol, name):
    """``max|err| ≤ bound_scale + atol``, naming the worst element (``err`` = out − ref)."""
    worst = err.abs().flatten().argmax().item() if err.numel() else 0
    max_err = err.abs().flatten()[worst].item() if err.numel() else 0.0
    bound = bound_scale + atol
    if not max_err <= bound:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{name}: max|out-ref| = {max_err:.3e} > {bound:.3e} at {index} "
            f"(ref there {ref.flatten()[worst].item():.4e})"
        )


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
    ref_max = ref.abs().max().item() if ref.numel() else 0.0
    assert_elementwise(out - ref, ref, ELEMENT_RTOL_FACTOR * rtol * ref_max, atol, name)


def assert_close_to_reference(out, ref64, same_dtype, name, atol=1e-6, times=2.0):
    """The sharper check: ``‖out − ref64‖`` within ``RTOL[out.dtype]·‖ref64‖`` or within
    ``times`` (twice) PyTorch's own same-dtype error ``‖same_dtype − ref64‖``, plus ``atol``.
    NaN never passes."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == same_dtype.dtype, f"{name}: dtype {out.dtype} != {same_dtype.dtype}"
    rtol = RTOL[out.dtype]
    out, ref64, same_dtype = (t.detach().double().cpu() for t in (out, ref64, same_dtype))
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - ref64).norm().item()
    torch_err = (same_dtype - ref64).norm().item()
    ref_norm = ref64.norm().item()
    bound = max(rtol * ref_norm, times * torch_err) + atol
    assert err <= bound, (
        f"{name}: ‖out-ref‖ = {err:.3e} > {bound:.3e} (torch's own error "
        f"{torch_err:.3e}, ‖ref‖ = {ref_norm:.3e})"
    )
    if out.numel():
        torch_max = (same_dtype - ref64).abs().max().item()
        ref_max = ref64.abs().max().item()
        scale = max(ELEMENT_RTOL_FACTOR * rtol * ref_max, ELEMENT_TORCH_FACTOR * torch_max)
        assert_elementwise(out - ref64, ref64, scale, atol, name)


# ------------------------------------------------------------------------------------- inputs

# Tests that take their inputs from randn() run on this device: MAGNETO_TEST_DEVICE=cuda with
# TRITON_INTERPRET=0 runs the Triton backend's CPU cases on a GPU (bench/gpu_check.sh).
TEST_DEVICE = os.environ.get("MAGNETO_TEST_DEVICE", "cpu")


def randn(*shape, dtype=torch.float32, mean=0.0, std=1.0, device=None, generator=None):
    """Fresh random normal values (optionally shifted: non-zero-mean rows are the hard case),
    drawn on the CPU (reproducible with ``generator``) and moved to ``device`` (default
    ``TEST_DEVICE``)."""
    t = torch.randn(*shape, dtype=torch.float64, generator=generator) * std + mean
    return t.to(device=device or TEST_DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------ backends


def _poison_triton():
    from magneto_kernels.triton import common

    previous = common.POISON
    common.POISON = True
    return lambda: setattr(common, "POISON", previous)


def _poison_extension():
    from magneto_kernels import _C

    _C._set_poison_outputs(True)
    return lambda: _C._set_poison_outputs(False)


@dataclass(frozen=True)
class Backend:
    """How the op tests run one backend."""

    name: str
    device: str
    poison: Optional[Callable[[], Callable[[], None]]] = None
    """Turns NaN-filling of fresh output buffers on; returns the function that turns it off."""
    gpu: bool = False
    """Needs a CUDA GPU: its tests are marked ``gpu`` (skipped on CPU-only machines)."""

    @property
    def family(self) -> Optional[str]:
        """The torch.library op family it runs (``library.get_op``); None for the reference."""
        return FAMILY.get(self.name)

    def problem(self) -> Optional[str]:
        """Why it cannot run here (a skip reason), or None."""
        return available_backends(self.device)[self.name]

    @contextlib.contextmanager
    def running(self):
        """Skips when the backend cannot run here; else poisons outputs for the block."""
        require_backend(self.name, self.device)
        restore = self.poison() if self.poison is not None else None
        try:
            yield self
        finally:
            if restore is not None:
                restore()


def require_backend(name: str, device: str = "cpu") -> None:
    """Skips the test, saying why, when backend ``name`` cannot run on ``device`` here (a CPU
    machine without a GPU, an extension built without it). CI cannot lose a backend this way:
    tests/test_reference.py::test_expected_backends_are_available fails instead."""
    problem = available_backends(device)[name]
    if problem is not None:
        pytest.skip(f"backend {name!r} unavailable on {device}: {problem}")


BACKENDS = (
    Backend("reference", TEST_DEVICE),
    Backend("cpu", "cpu", poison=_poison_extension),
    # On CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py's default).
    Backend("triton", TEST_DEVICE, poison=_poison_triton),
    # MAGNETO_CUDA_EMULATE=1: the CUDA kernels compiled for the CPU, on CPU tensors (csrc/cuda_emu).
    Backend(
        "cuda", "cpu" if EMULATED_CUDA else "cuda", poison=_poison_extension, gpu=not EMULATED_CUDA
    ),
)
BY_NAME = {b.name: b for b in BACKENDS}

GPU = pytest.mark.gpu
# A case whose kernel branches other cases of its test already take (at a smaller shape or in
# another dtype): `make test` runs it in the main stage, and its newest-Triton stage, which
# checks that every path still works under that Triton, leaves it out (-m "not repeats_path").
REPEATS_PATH = pytest.mark.repeats_path


def backend_params(kernels_only=False):
    """BACKENDS as pytest parameters (``kernels_only``: those with an op family)."""
    return [
        pytest.param(b, id=b.name, marks=[GPU] if b.gpu else [])
        for b in BACKENDS
        if b.family is not None or not kernels_only
    ]


# --------------------------------------------------------------------------- the comparison


def compare_to_reference(backend: Backend, fn, inputs: dict, *, seed=0):
    """Runs ``fn(**inputs, backend=...)`` on ``backend``, on the reference in the inputs' dtype
    and on the reference in float64 (the same inputs, the same dropout seed through
    ``torch.manual_seed(seed)``), backpropagates one random non-zero-mean gradient per output,
    and checks every output and the gradient of every given input (``inputs`` maps names to
    tensors or None)."""
    runs = (
        (backend.name, lambda t: t),
        ("reference", lambda t: t),
        ("reference", lambda t: t.double()),
    )
    names = [name for name, t in inputs.items() if t is not None]
    x = inputs[names[0]]
    rows = x.numel() // max(x.shape[-1], 1)
    results = []
    for name, cast in runs:
        leaves = {
            k: None if t is None else cast(t).detach().clone().requires_grad_(True)
            for k, t in inputs.items()
        }
        torch.manual_seed(seed)
        outs = fn(**leaves, backend=name)
        results.append((leaves, outs if isinstance(outs, tuple) else (outs,)))
    gen = torch.Generator().manual_seed(1234)
    dys = [
        randn(*o.shape, dtype=torch.float64, mean=0.3, generator=gen, device=o.device)
        for o in results[2][1]
    ]
    for i, (out, same, out64) in enumerate(zip(*(outs for _, outs in results))):
        assert_close_to_reference(out, out64, same, f"output {i}", atol=ATOL)
    grads = [
        torch.autograd.grad(
            outs, [leaves[k] for k in names], [dy.to(o.dtype) for dy, o in zip(dys, outs)]
        )
        for leaves, outs in results
    ]
    for name, grad, same, grad64 in zip(names, *grads):
        scale = rows**0.5 if grad.dim() == 1 else 1.0
        assert_close_to_reference(grad, grad64, same, f"grad of {name}", atol=ATOL * scale)


# --------------------------------------------------------------------------------------- cases

ACTS = tuple(ACTIVATIONS)
GATED = tuple(GATED_ACTIVATIONS)
NORM_NAMES = tuple(n for n in NORMS if n != "none")
"""The norms of layer_norm and add_layer_norm; ln_linear also takes "none" (no norm)."""

# (rows, cols). Every kernel path of every backend: one row and one column, the CUDA warp per
# row (up to 250), block per row (1000, 4097), the Triton chunked row (65536), and widths
# around 4096. GPU-sized ones, marked gpu: CUDA's backward wide kernels (8200 > 8192), forward
# wide kernel for fp32 (16390 > 16384), more rows than its register kernel has row groups.
NORM_SHAPES = [
    (1, 1),
    (5, 1),
    (7, 33),
    (3, 37),
    (37, 199),
    (37, 257),
    (64, 250),
    (3, 1000),
    (9, 1000),
    (3, 4097),
    (3, 4099),
    (2, 65536),
    pytest.param((3000, 1000), marks=GPU),
    pytest.param((3, 8200), marks=GPU),
    pytest.param((2, 16390), marks=GPU),
]


def norm_inputs(rows, cols, dtype, norm, device):
    """x (mean 3) and the norm's parameters: float32 ones for odd widths, x's dtype for even,
    so both parameter dtypes get covered."""
    param_dtype = torch.float32 if cols % 2 else dtype
    return {
        "x": randn(rows, cols, dtype=dtype, mean=3.0, std=2.0, device=device),
        "weight": randn(cols, dtype=param_dtype, mean=1.0, std=0.3, device=device),
        "bias": (
            randn(cols, dtype=param_dtype, mean=0.2, std=0.5, device=device)
            if norm == "layer"
            else None
        ),
    }


# id: (shape, dtype, x mean, x std, eps, float32 parameters: None, "weight" or "weight+bias";
# RMSNorm drops the bias): batch dimensions, float32 parameters with bf16 rows, |mean|/std up to
# 1e3 (fp32 LayerNorm loses digits there, a backend no more than twice PyTorch's).
NORM_SPECIAL_CASES = {
    "bf16-fp32-params-batch": ((2, 5, 96), torch.bfloat16, -3.0, 1.0, 1e-5, "weight+bias"),
    "no-affine": ((9, 130), torch.float32, 5.0, 1.0, 1e-5, None),
    "no-affine-batch": ((2, 3, 45), torch.float32, -4.0, 0.5, 1e-6, None),
    "no-affine-mean-300": ((2, 3, 777), torch.float32, 300.0, 0.5, 1e-6, None),
    "mean-1000-weight-only": ((16, 512), torch.float32, 1000.0, 1.0, 1e-5, "weight"),
    "mean-1000": ((8, 1000), torch.float32, 1000.0, 1.0, 1e-5, "weight+bias"),
}


# (norm, (rows, cols), alpha, parameter dtype: "fp32" or "same" as x's)
ADD_NORM_CASES = [
    ("layer", (13, 161), 1.0, "same"),
    ("layer", (13, 161), 2.3, "same"),
    ("rms", (13, 161), 0.7, "same"),
    ("layer", (37, 199), 0.81, "fp32"),
    ("rms", (5, 1000), 0.81, "fp32"),
    ("layer", (2, 65536), 0.81, "fp32"),
    ("layer", (33, 127), 1.0, "same"),
    ("rms", (16, 1024), 2.5, "same"),
    pytest.param(("layer", (3, 40000), 0.7, "same"), marks=GPU),  # CUDA's wide (Welford) path
]

# (rows, in, out, norm, input_activation, activation, residual alpha or None for no residual,
#  dropout_p, bias, ln params dtype: "fp32" or "same" as x's)
_LN_LINEAR_SCENARIOS = [
    (37, 67, 45, "layer", "none", "none", None, 0.0, True, "same"),  # fc1 / q-k-v
    (37, 67, 45, "layer", "gelu", "none", 1.0, 0.0, True, "same"),  # fc2: act(preact) -> LN
    (37, 67, 45, "layer", "none", "none", 2.5, 0.0, False, "same"),  # out_proj, alpha·res
    (37, 67, 45, "rms", "silu", "gelu_tanh", 0.5, 0.0, True, "same"),
    (37, 67, 45, "layer", "relu", "relu", None, 0.0, True, "same"),
    (37, 67, 45, "layer", "gelu_tanh", "silu", 1.0, 0.3, True, "same"),
    (37, 67, 45, "rms", "none", "gelu", None, 0.2, False, "same"),
    (37, 67, 45, "none", "none", "none", None, 0.0, True, "same"),  # plain linear
    (37, 67, 45, "none", "gelu", "none", 1.5, 0.1, True, "same"),  # activation, no norm
    (37, 67, 45, "layer", "none", "none", 1.0, 0.4, True, "same"),  # dropout only
    (37, 67, 45, "layer", "gelu", "silu", 1.0, 0.25, True, "fp32"),
    (37, 199, 61, "layer", "none", "none", None, 0.0, True, "fp32"),
    (3, 37, 199, "layer", "gelu", "gelu", 0.7, 0.0, True, "same"),
    (199, 37, 3, "rms", "none", "relu", None, 0.2, False, "fp32"),
    (1, 1, 1, "layer", "none", "silu", 0.7, 0.0, True, "fp32"),
    (5, 1000, 3, "layer", "silu", "gelu_tanh", None, 0.0, True, "same"),
    (37, 64, 37, "none", "gelu_tanh", "none", 0.7, 0.3, True, "fp32"),
    (37, 61, 45, "rms", "relu", "gelu", 0.7, 0.5, True, "same"),
    (2, 3, 5, "none", "none", "silu", None, 0.0, False, "fp32"),
    (2, 9000, 3, "layer", "gelu", "none", 0.7, 0.0, True, "fp32"),  # chunked row statistics
    # Gated input activations (x = [gate | up], 2·in wide): BitNet's down_proj (RMSNorm of
    # relu2(gate)·up), Llama's (SwiGLU, no norm, the residual added), and the other paths.
    (37, 67, 45, "rms", "relu2_glu", "none", 1.0, 0.0, False, "same"),
    (37, 67, 45, "none", "swiglu", "none", 1.0, 0.0, False, "same"),
    (37, 64, 45, "layer", "geglu", "gelu", None, 0.2, True, "fp32"),
    (37, 61, 45, "none", "geglu", "relu2", 0.7, 0.3, True, "same"),
    (5, 1000, 3, "rms", "swiglu", "none", None, 0.0, True, "same"),
    (3, 37, 199, "layer", "relu2_glu", "silu", 0.7, 0.0, True, "same"),
    (1, 1, 1, "rms", "swiglu", "none", 0.7, 0.0, True, "fp32"),
    (2, 9000, 3, "layer", "relu2_glu", "none", 0.7, 0.0, True, "fp32"),  # chunked row statistics
]
# The option combinations of the CUDA kernel's dispatch, at a shape of their own (several
# column tiles, masked tails). Under Triton every branch they take is also taken by a scenario
# above or the in-/out- cases below, so the newest-Triton stage of `make test` leaves them out
# (marked REPEATS_PATH); the main stage runs them on every backend under the oldest Triton.
_CUDA_COMBOS = [
    ("layer", "none", "none", None, 0.0, True),
    ("layer", "none", "gelu", None, 0.0, True),
    ("layer", "gelu", "none", 1.0, 0.0, True),
    ("rms", "silu", "gelu_tanh", 0.5, 0.2, False),
    ("layer", "relu", "silu", 2.0, 0.1, True),
    ("none", "gelu_tanh", "relu", None, 0.3, True),
    ("none", "none", "none", 1.0, 0.0, False),
    ("rms", "relu2_glu", "none", 1.0, 0.0, False),
    ("none", "swiglu", "none", 1.0, 0.0, False),
    ("layer", "geglu", "relu2", None, 0.2, True),
]


def _ids(case):
    return "-".join(map(str, case))


LN_LINEAR_CASES = (
    [pytest.param(c, id=_ids(c)) for c in _LN_LINEAR_SCENARIOS]
    + [
        pytest.param((37, 65, 129, *c, "same"), id=_ids((37, 65, 129, *c)), marks=REPEATS_PATH)
        for c in _CUDA_COMBOS
    ]
    # Every activation in both places, from the codes table: a new one is tested unasked.
    + [
        pytest.param((9, 24, 16, "layer", a, "none", 1.0, 0.0, True, "fp32"), id=f"in-{a}")
        for a in ACTS + GATED
    ]
    + [
        pytest.param((9, 24, 16, "rms", "none", a, None, 0.1, True, "same"), id=f"out-{a}")
        for a in ACTS
    ]
    # GPU-sized: in_features 9000 (CUDA's wide K) and 40000 (the prologue's Welford kernel,
    # whose input activation is a runtime switch).
    + [
        pytest.param((4, 9000, 24, *c, "same"), id=_ids((4, 9000, 24, *c)), marks=GPU)
        for c in _CUDA_COMBOS
    ]
    + [
        pytest.param((3, 40000, 16, *c, "same"), id=_ids((3, 40000, 16, *c)), marks=GPU)
        for c in _CUDA_COMBOS[2:4]
    ]
)


def ln_linear_inputs(
    rows, k, n, norm, residual, bias, param, dtype, device, mean=1.5, input_activation="none"
):
    """The six tensor arguments of ln_linear (None where absent); x has row mean ``mean``, and
    2·k columns ([gate | up]) for a gated input activation."""
    p_dtype = torch.float32 if param == "fp32" else dtype
    x_cols = 2 * k if input_activation in GATED_ACTIVATIONS else k
    return {
        "x": randn(rows, x_cols, dtype=dtype, mean=mean, std=2.0, device=device),
        "ln_weight": (
            None if norm == "none" else randn(k, dtype=p_dtype, mean=1.0, std=0.3, device=device)
        ),
        "ln_bias": (
            randn(k, dtype=p_dtype, mean=0.1, std=0.3, device=device) if norm == "layer" else None
        ),
        "weight": randn(n, k, dtype=dtype, std=k**-0.5, device=device),
        "bias": randn(n, dtype=dtype, mean=0.1, std=0.2, device=device) if bias else None,
        "residual": randn(rows, n, dtype=dtype, mean=-0.5, device=device) if residual else None,
    }


def ln_linear_fn(norm, input_activation, activation, alpha, dropout_p):
    """ln_linear with those options, as compare_to_reference calls it."""

    def fn(x, ln_weight, ln_bias, weight, bias, residual, backend):
        return mk.ln_linear(
            x,
            ln_weight,
            ln_bias,
            weight,
            bias,
            residual=residual,
            norm="layer" if norm == "none" else norm,
            input_activation=input_activation,
            activation=activation,
            alpha=1.0 if alpha is None else alpha,
            dropout_p=dropout_p,
            backend=backend,
        )

    return fn


def check_ln_linear_case(backend: Backend, case, dtype):
    """One LN_LINEAR_CASES entry on ``backend`` against the float64 reference."""
    rows, k, n, norm, in_act, act, alpha, p, bias, param = case
    inputs = ln_linear_inputs(
        rows,
        k,
        n,
        norm,
        alpha is not None,
        bias,
        param,
        dtype,
        backend.device,
        input_activation=in_act,
    )
    compare_to_reference(backend, ln_linear_fn(norm, in_act, act, alpha, p), inputs, seed=rows + k)
