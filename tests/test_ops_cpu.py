"""What only the C++ CPU backend (``backend="cpu"``) has; tests/test_ops.py runs the op suite on it.

Parameter gradients independent of the thread count, every instruction-set build of the
kernels, both GEMM engines and the workspace policy, agreement with the Triton kernels, and the
GELU's accuracy. Every output and intermediate buffer of the bindings is NaN-poisoned before the
kernels write it.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from harness import (
    BY_NAME,
    assert_close_to_reference,
    check_ln_linear_case,
    randn,
    require_backend,
)

import magneto_kernels as mk
from magneto_kernels.library import get_op

_C = pytest.importorskip("magneto_kernels._C", reason="C++ extension not built")
CPU = BY_NAME["cpu"]


@pytest.fixture(autouse=True)
def poison_outputs():
    with CPU.running():
        yield


def test_parameter_gradients_do_not_depend_on_thread_count():
    x = randn(300, 72, mean=1.0)
    w, b = randn(72, mean=1.0), randn(72)
    dy = randn(300, 72, mean=0.2)
    _, mean, rstd = get_op("layer_norm", CPU.family)(x, w, b, 1e-5, "layer")
    bwd = get_op("layer_norm_backward", CPU.family)
    _, dw, db = bwd(dy, x, w, b, mean, rstd, None, "layer", [True, True, True])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, dw1, db1 = bwd(dy, x, w, b, mean, rstd, None, "layer", [False, True, True])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(dw, dw1) and torch.equal(db, db1), "dgamma/dbeta depend on thread count"


# ----------------------------------------------------------------- instruction-set builds

# A fresh process's ln_linear forward+backward (and an RMSNorm) against the reference.
_SUBPROCESS_SCRIPT = r"""
import torch, magneto_kernels as mk
from magneto_kernels import _C, reference
{check}
torch.manual_seed(0)
rows, cols = {rows}, {cols}
x = (torch.randn(rows, cols) * 2 + 1).requires_grad_()
lw, lb = torch.randn(cols).requires_grad_(), torch.randn(cols).requires_grad_()
w, r = (torch.randn(47, cols) * 0.1).requires_grad_(), torch.randn(rows, 47)
b = torch.randn(47).requires_grad_()
dy = torch.randn(rows, 47)
outs = []
for backend in ("cpu", "reference"):
    torch.manual_seed(1)
    y = mk.ln_linear(x, lw, lb, w, None, residual=r, input_activation="gelu",
                     activation="silu", dropout_p=0.3, backend=backend)
    outs.append([y] + list(torch.autograd.grad(y, (x, lw, lb, w), dy)))
    # fc2's case: the residual folded into the GEMM's output (or added after it), with a bias
    y = mk.ln_linear(x, lw, lb, w, b, residual=r, alpha=0.7, input_activation="gelu",
                     backend=backend)
    outs[-1] += [y] + list(torch.autograd.grad(y, (x, lw, lb, w, b), dy))
    outs[-1].append(mk.layer_norm(x, lw, None, norm="rms", backend=backend))
for a, b in zip(*outs):
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-5, err
print("ok")
"""


def run_subprocess_check(check: str, rows=29, cols=83, **env):
    env = dict(os.environ, OMP_NUM_THREADS="2", **env)
    script = _SUBPROCESS_SCRIPT.format(check=check, rows=rows, cols=cols)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


ISAS = ("avx512", "avx2", "default")  # widest first, as MAGNETO_CPU_ISA names them


@pytest.mark.parametrize("isa", ISAS)
def test_instruction_set_builds(isa):
    """Every build of the kernels (chosen by MAGNETO_CPU_ISA) agrees with the reference. A build
    the CPU lacks falls back to the widest supported one below it, with a RuntimeWarning naming
    both; `make test` also runs the whole C++ op suite under each build the CPU supports."""
    supported = _C.cpu_isas()
    expected = next(name for name in ISAS[ISAS.index(isa) :] if name in supported)
    check = (
        f"assert _C.cpu_capability() == {expected!r}, _C.cpu_capability()\n"
        f"assert _C.cpu_isas() == {supported!r}\n"
    )
    run_subprocess_check(
        check,
        MAGNETO_CPU_ISA=isa,
        PYTHONWARNINGS="error::RuntimeWarning" if expected == isa else "default",
    )


def test_instruction_set_fallback_is_said():
    """Asking for a build the CPU lacks warns once at import (on an AVX2-only CPU: avx512)."""
    missing = [name for name in ISAS if name not in _C.cpu_isas()]
    if not missing:
        pytest.skip(f"this CPU runs every build ({', '.join(ISAS)}): there is no fallback")
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import magneto_kernels"],
        env=dict(os.environ, MAGNETO_CPU_ISA=missing[0]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"MAGNETO_CPU_ISA={missing[0]} needs" in proc.stderr, proc.stderr[-2000:]


def test_unknown_instruction_set_is_refused():
    proc = subprocess.run(
        [sys.executable, "-c", "import magneto_kernels"],
        env=dict(os.environ, MAGNETO_CPU_ISA="avx1024"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "MAGNETO_CPU_ISA must be 'avx512', 'avx2', 'default' or 'auto'" in proc.stderr
    assert "got 'avx1024'" in proc.stderr


# ------------------------------------------------------------- GEMM engine and workspace


@pytest.fixture
def gemm_policy():
    """Sets the GEMM engine policy for a test (``_C._set_cpu_gemm_policy``), then puts back the
    environment's."""
    yield _C._set_cpu_gemm_policy
    _C._set_cpu_gemm_policy(os.environ.get("MAGNETO_CPU_GEMM", "auto"))


ROLES = ("forward", "input_grad", "weight_grad")


@pytest.mark.parametrize("policy", ["aten", "onednn", "widened", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_layouts(gemm_policy, policy, dtype, accumulate):
    """The three GEMMs of ln_linear (H @ W^T, dz @ W, dz^T @ H: plain and transposed operands)
    on each engine against float64, with and without accumulating into the output, and into a
    new tensor (bf16 on an ISA where oneDNN refuses it: aten runs it; float32 pinned to widened:
    aten runs it); empty sums give zeros."""
    gemm_policy(policy)
    h = randn(37, 53, mean=0.5, dtype=dtype)
    w, dz = randn(29, 53, std=0.2, dtype=dtype), randn(37, 29, mean=-0.3, dtype=dtype)
    for role, (a, b) in zip(ROLES, ((h, w.t()), (dz, w), (dz.t(), h))):
        start = randn(a.shape[0], b.shape[1], dtype=dtype)
        out = start.clone() if accumulate else torch.full_like(start, float("nan"))
        _C._cpu_gemm(a, b, out, accumulate, role)
        want = a.double() @ b.double() + (start.double() if accumulate else 0)
        same = (a.float() @ b.float() + (start.float() if accumulate else 0)).to(dtype)
        assert_close_to_reference(out, want, same, f"{role} {policy}")
        if not accumulate:  # into a new tensor: the engine's own output
            new = _C._cpu_gemm(a, b, None, False, role)
            assert new.shape == out.shape and new.dtype == dtype and new.is_contiguous()
            assert_close_to_reference(new, want, same, f"{role} {policy}, new tensor")
    empty = torch.full((4, 3), float("nan"))
    _C._cpu_gemm(randn(4, 0), randn(0, 3), empty, False)
    assert torch.equal(empty, torch.zeros(4, 3))
    assert torch.equal(_C._cpu_gemm(randn(4, 0), randn(0, 3), None, False), torch.zeros(4, 3))


def test_widened_never_narrows(gemm_policy):
    """Pinned to widened, a float64 GEMM stays float64 (only bf16/fp16 operands widen)."""
    gemm_policy("widened")
    a, b = randn(5, 7, dtype=torch.float64), randn(7, 3, dtype=torch.float64)
    out = _C._cpu_gemm(a, b, None, False, "forward")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", ["aten", "onednn", "widened"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ln_linear_on_each_gemm_engine(gemm_policy, policy, dtype):
    """ln_linear's forward and every gradient with its GEMMs pinned to each engine, in the
    dtypes where they differ most (widened runs them in float32; oneDNN refuses them on some
    CPUs, aten then runs them), against float64: a norm with an input activation and a
    residual, and a gated one with an output activation."""
    gemm_policy(policy)
    for case in (
        (33, 40, 24, "layer", "gelu", "none", 0.7, 0.0, True, "fp32"),
        (20, 24, 40, "rms", "swiglu", "relu2", None, 0.0, False, "same"),
    ):
        check_ln_linear_case(CPU, case, dtype)


def test_gemm_engine_is_measured_per_role_and_repeats_bitwise(gemm_policy):
    """auto: the first GEMM of a (role, dtype, size class) times both engines and writes the
    chosen one's result, so the same call again is bit-identical; the engine string lists each
    choice by role."""
    gemm_policy("auto")
    x, lw, lb = randn(64, 48, mean=1.0), randn(48, mean=1.0), randn(48)
    w, b = randn(40, 48, std=0.2), randn(40)
    first = [t.detach() for t in _ln_linear_fwd_bwd(x, lw, lb, w, b)]
    again = [t.detach() for t in _ln_linear_fwd_bwd(x, lw, lb, w, b)]
    for name, u, v in zip(
        ("out", "dx", "dln_weight", "dln_bias", "dweight", "dbias"), first, again
    ):
        assert torch.equal(u, v), name
    engine = _C.cpu_gemm_engine()
    if "onednn unavailable" not in engine:
        for role in ("forward", "input gradient", "weight gradient"):
            assert f"; {role} Float M<=64 " in engine, engine


def test_gemm_engine_into_a_given_output_is_its_own_measurement(gemm_policy):
    """A linear into a given output (a concat group's column ranges) is measured apart from one
    into a new tensor: oneDNN, which returns a new tensor, pays a copy there that its
    measurement must count. The concat result equals the list form's columns bit for bit."""
    gemm_policy("auto")
    x, lw = randn(64, 48, mean=1.0), randn(48, mean=1.0)
    ws, bs = [randn(40, 48, std=0.2), randn(24, 48, std=0.2)], [randn(40), randn(24)]
    listed = mk.ln_linear_group(x, lw, None, ws, bs, norm="rms", backend="cpu")
    joined = mk.ln_linear_group(x, lw, None, ws, bs, norm="rms", concat=True, backend="cpu")
    assert torch.equal(joined, torch.cat(listed, -1))
    engine = _C.cpu_gemm_engine()
    if "onednn unavailable" not in engine:
        for into in ("", " into a given output"):
            assert re.search(rf"; forward Float M<=64 N<=64 K<=64 \d+t{into}: ", engine), engine


def _ln_linear_fwd_bwd(x, lw, lb, w, b):
    params = [t.clone().requires_grad_() for t in (x, lw, lb, w, b)]
    out = mk.ln_linear(*params, backend="cpu")
    out.backward(randn(*out.shape, mean=0.1, generator=torch.Generator().manual_seed(1)))
    return [out, *(p.grad for p in params[:3]), params[3].grad, params[4].grad]


def test_gemm_engine_falls_back_when_onednn_is_missing(gemm_policy):
    """A torch without the oneDNN operator (hidden here): pinned to onednn, aten runs every GEMM
    with no error, and the engine string says so."""
    gemm_policy("onednn", hide_onednn=True)
    assert "onednn unavailable; policy onednn" in _C.cpu_gemm_engine()
    x, lw, lb = randn(64, 48, mean=1.0), randn(48, mean=1.0), randn(48)
    w, b = randn(40, 48, std=0.2), randn(40)
    got = _ln_linear_fwd_bwd(x, lw, lb, w, b)
    gemm_policy("aten")
    want = _ln_linear_fwd_bwd(x, lw, lb, w, b)
    for u, v in zip(got, want):
        assert torch.equal(u, v)


def test_gemm_policy_is_checked(gemm_policy):
    with pytest.raises(
        RuntimeError,
        match="MAGNETO_CPU_GEMM must be 'auto', 'aten', 'onednn', 'few_rows' or 'widened'",
    ):
        gemm_policy("mkl")
    with pytest.raises(RuntimeError, match="role must be"):
        _C._cpu_gemm(randn(2, 2), randn(2, 2), torch.empty(2, 2), False, "backward")
    env = {**os.environ, "MAGNETO_CPU_GEMM": "aten"}
    code = "from magneto_kernels import _C; print(_C.cpu_gemm_engine())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "; policy aten" in proc.stdout, proc.stderr


def test_gemm_engine_is_reported():
    """torch's GEMMs, oneDNN's where torch has it, and the few-row kernel where the build has
    it (not the portable one)."""
    engine = _C.cpu_gemm_engine()
    assert engine.startswith("aten (mkl)" if torch.backends.mkl.is_available() else "aten")
    few = f"; linear at 1-{FEW_ROWS_MAX} rows: magneto few-row kernel"
    assert (few in engine) == (_C.cpu_capability() != "default")


FEW_ROWS_MAX = 16  # csrc/cpu/dispatch.cpp, linear_few_rows_max()


def _linear(x, w, b):
    """The forward GEMM of ln_linear alone (no norm, no activation): gemm::linear."""
    op = get_op("ln_linear", CPU.family)
    return op(x, None, None, w, b, None, None, 1e-5, "none", "none", "none", 1.0, 0.0)[0]


# The few-row kernels of a dtype, each as the environment that selects it: bf16 has three on the
# AVX-512 build, AMX-BF16 tiles and AVX512-BF16 dot products where the CPU has them
# (MAGNETO_CPU_AMX=0 skips the tiles, MAGNETO_CPU_BF16_DOT=0 the dot products) and the float32
# FMAs (csrc/cpu/few_rows.h); a CPU without an extension runs the next kernel in each case.
FEW_ROW_KERNELS = {
    "fp32": (torch.float32, {}),
    "bf16_amx": (torch.bfloat16, {}),
    "bf16_dot": (torch.bfloat16, {"MAGNETO_CPU_AMX": "0"}),
    "bf16_fma": (torch.bfloat16, {"MAGNETO_CPU_AMX": "0", "MAGNETO_CPU_BF16_DOT": "0"}),
    "fp16": (torch.float16, {}),
}


@pytest.mark.parametrize(("dtype", "env"), FEW_ROW_KERNELS.values(), ids=FEW_ROW_KERNELS)
@pytest.mark.parametrize("k", [37, 64, 200])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_few_row_linear(gemm_policy, monkeypatch, dtype, env, k, bias):
    """The decode-size GEMM (kernels.h, linear_few_rows; pinned with the few_rows policy, aten
    past its rows) at every row count up to two past its limit: full row tiles (8 rows on AVX-512,
    4 on AVX2) and every edge, an odd number of weight rows (23: 11 column pairs and one alone,
    or at one row 5 column quadruples and 3 alone; one full group of 16 AMX tile rows and a
    zero-padded one), k with a vector tail (37; 200 = 12.5 AVX-512 float vectors, 6.25 bf16 pair
    vectors and AMX blocks) and without (64), x with a non-zero mean, every dtype and kernel;
    judged against float64 as F.linear in that dtype is."""
    gemm_policy("few_rows")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    n = 23
    w = randn(n, k, std=k**-0.5, dtype=dtype)
    b = randn(n, mean=0.3, dtype=dtype) if bias else None
    for rows in range(1, FEW_ROWS_MAX + 3):
        x = randn(rows, k, mean=1.0, dtype=dtype)
        y64 = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        same = torch.nn.functional.linear(x, w, b)
        assert_close_to_reference(_linear(x, w, b), y64, same, f"{rows} rows")


def test_pinned_aten_runs_aten_at_few_rows(gemm_policy):
    """MAGNETO_CPU_GEMM=aten pins every forward GEMM to torch's, the fp32 rows that the default
    policy gives the few-row kernel unmeasured included: bit-equal to torch.addmm at every row
    count, where the kernel's sums (another order) are not."""
    if _C.cpu_capability() == "default":
        pytest.skip("the portable build has no few-row kernel (MKL runs these rows)")
    w, b = randn(23, 200, std=200**-0.5), randn(23, mean=0.3)
    differs = False
    for rows in range(1, FEW_ROWS_MAX + 1):
        x = randn(rows, 200, mean=1.0)
        gemm_policy("aten")
        assert torch.equal(_linear(x, w, b), torch.addmm(b, x, w.t())), f"{rows} rows"
        gemm_policy("auto")
        differs = differs or not torch.equal(_linear(x, w, b), torch.addmm(b, x, w.t()))
    assert differs, "the few-row kernel's sums matched MKL's bit for bit: the test shows nothing"


@pytest.mark.parametrize(
    ("dtype", "env"), list(FEW_ROW_KERNELS.values())[:4], ids=list(FEW_ROW_KERNELS)[:4]
)
def test_few_row_linear_does_not_depend_on_thread_count(gemm_policy, monkeypatch, dtype, env):
    """Each output is one fixed-order dot product, whichever thread computes it: the two threads
    split 300 column tiles here (150 at one row)."""
    if _C.cpu_capability() == "default":
        pytest.skip("the portable build has no few-row kernel (MKL runs these rows)")
    gemm_policy("few_rows")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    w, b = randn(600, 64).to(dtype), randn(600).to(dtype)
    for rows in (1, FEW_ROWS_MAX):  # one row: 1x4 tiles; more: 8x2 (4x2 on AVX2)
        x = randn(rows, 64, mean=1.0).to(dtype)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            y2 = _linear(x, w, b)
            torch.set_num_threads(1)
            y1 = _linear(x, w, b)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(y1, y2), f"{rows} rows"


def test_without_workspace():
    """MAGNETO_CPU_WORKSPACE_MB=0: forward and backward allocate their GEMM operand per call."""
    run_subprocess_check("", MAGNETO_CPU_WORKSPACE_MB="0")


def test_row_blocked_forward():
    """An operand of 1000×300 fp32 (1.14 MiB) through a 1 MiB workspace: the forward runs in two
    row blocks (873 + 127 rows), the backward allocates its operand."""
    run_subprocess_check("", rows=1000, cols=300, MAGNETO_CPU_WORKSPACE_MB="1")


# ------------------------------------------------------------------- agreement with Triton


def test_cpu_agrees_with_triton_interpreter():
    require_backend("triton")
    x = randn(19, 40, mean=1.0, std=2.0)
    lw, lb = randn(40, mean=1.0, std=0.2), randn(40, std=0.3)
    w, b, r = randn(24, 40, std=0.15), randn(24), randn(19, 24)
    dy = randn(19, 24, mean=0.2)
    results = {}
    for backend in ("cpu", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lw, lb, w, b, r)]
        torch.manual_seed(11)
        y = mk.ln_linear(
            *leaves[:5],
            residual=leaves[5],
            input_activation="gelu",
            activation="gelu_tanh",
            alpha=1.5,
            dropout_p=0.25,
            backend=backend,
        )
        z, s = mk.add_layer_norm(
            leaves[0], leaves[0] * 0.5, leaves[1], leaves[2], alpha=0.8, backend=backend
        )
        results[backend] = [y, z, s, *torch.autograd.grad((y * dy).sum() + (z * z).sum(), leaves)]
    # A different dropout mask would change whole elements of y and of every gradient.
    for i, (c, t) in enumerate(zip(results["cpu"], results["triton"])):
        torch.testing.assert_close(c, t, rtol=2e-5, atol=2e-5, msg=lambda m: f"output {i}: {m}")


def test_gelu_accuracy():
    """The C++ GELU and its derivative, over [-10, 10] and a normal sample, within an error
    bound derived from how they are computed, element by element, against float64 — not
    against torch's own fp32 F.gelu, whose error depends on the ISA path torch takes (AVX2 and
    AVX-512 builds differ). ln_linear without a norm and with a 1×1 identity weight returns
    gelu(x) exactly through the GEMM.

    The kernel computes the tail Φ(−|x|) = (1 − q)·m(q)·exp(−x²/2) (q = (|x| − K)/(|x| + K), m a
    fitted polynomial of 0.11 ulp; exp(−x²/2) from an exact split of x², so its argument's
    rounding is not magnified), from which Φ(x) = tail or 1 − tail, GELU = x·Φ(x) and
    GELU' = Φ(x) + x·φ(x). With u = 2^-24 (half an fp32 ulp, relative), each step's rounding
    counted once:
      err Φ     ≤ 8u·tail + u·Φ              (q, the polynomial, exp and the products; 1 − tail)
      rel err φ ≤ 6u                         (exp's reduction, polynomial and scaling)
      GELU:  |x|·err Φ + 2u·|GELU|
      GELU': err Φ + |x|·φ·rel err φ + 2u·(Φ + |x|·φ)
    It replaced Abramowitz–Stegun 7.1.26 (|error| ≤ 7.5e-8 absolute: thousands of ulps of a
    small tail); every instruction-set build runs this test (the Makefile's per-ISA runs)."""
    x = torch.cat([torch.linspace(-10, 10, 20001), randn(20000, std=3.0)]).reshape(-1, 1)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ours = mk.ln_linear(
        xs[0], None, None, torch.ones(1, 1), None, input_activation="gelu", backend="cpu"
    )
    # x·Φ(x) by erfc: float64's F.gelu forms 1 + erf(x/√2), which is 0 below x ≈ −8.3
    x64 = xs[1].double()
    ref = x64 * 0.5 * torch.special.erfc(-x64 / math.sqrt(2.0))
    d_ours, d_ref = (torch.autograd.grad(y.sum(), t)[0] for y, t in zip((ours, ref), xs))
    x = x.double()
    u = 2.0**-24
    tail = 0.5 * torch.special.erfc(x.abs() / math.sqrt(2.0))
    cdf = torch.where(x < 0, tail, 1 - tail)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    err_cdf = 8 * u * tail + u * cdf
    rel_err_pdf = 6 * u
    bounds = {
        "gelu": x.abs() * err_cdf + 2 * u * (x * cdf).abs(),
        "gelu'": err_cdf + x.abs() * pdf * rel_err_pdf + 2 * u * (cdf + x.abs() * pdf),
    }
    for name, out, r in (("gelu", ours, ref), ("gelu'", d_ours, d_ref)):
        err = (out.double() - r).detach().abs()
        # at x = 0 both the error and the bound are 0: compare, do not divide
        assert not torch.isnan(err).any(), f"{name}: NaN"
        ratio = torch.where(err > 0, err / bounds[name], 0.0)
        worst = ratio.argmax()
        assert (err <= bounds[name]).all(), (
            f"{name} on {_C.cpu_capability()}: error {err.flatten()[worst]:.3e} "
            f"at x = {x.flatten()[worst]:.6f} exceeds the bound by "
            f"{ratio.max():.3f}x"
        )


def test_gelu_beyond_the_clamps():
    """Where the kernel clamps (|x| > 13.2 in exp(−x²/2), 13.5 in the tail's polynomial) and at
    NaN: GELU(x) = x and GELU'(x) = 1 far right, both vanish far left, NaN stays NaN (the clamps
    pass a NaN argument through)."""
    x = torch.tensor([20.0, 1e30, 13.4, 13.6, -13.4, -13.6, -20.0, -1e30, float("nan")])
    x = x.reshape(-1, 1).requires_grad_()
    y = mk.ln_linear(x, None, None, torch.ones(1, 1), None, input_activation="gelu", backend="cpu")
    (dx,) = torch.autograd.grad(y.sum(), x)
    y, dx = y.detach().flatten(), dx.flatten()
    assert torch.equal(y[:4], x.detach().flatten()[:4]) and torch.equal(dx[:4], torch.ones(4))
    assert (y[4:8].abs() <= 1e-37).all() and (dx[4:8].abs() <= 1e-36).all(), (y, dx)
    assert y[8].isnan() and dx[8].isnan()
