"""The reference ops themselves: Philox against a plain-integer implementation, the dropout
mask's statistics, the public functions' argument checks and the backend choice."""

import os

import pytest
import torch
from harness import assert_close, randn

import magneto_kernels as mk
from magneto_kernels import reference
from magneto_kernels.backends import resolve_backend


def _philox_int(seed: int, index: int) -> int:
    """Philox4x32-10 on Python integers, written from the Random123 description."""
    m = 0xFFFFFFFF
    c = [index & m, index >> 32, 0, 0]
    k = [seed & m, (seed >> 32) & m]
    for _ in range(10):
        pb = 0xCD9E8D57 * c[2]
        pa = 0xD2511F53 * c[0]
        c = [((pb >> 32) ^ c[1] ^ k[0]) & m, pb & m, ((pa >> 32) ^ c[3] ^ k[1]) & m, pa & m]
        k = [(k[0] + 0x9E3779B9) & m, (k[1] + 0xBB67AE85) & m]
    return c[0]


def test_philox_matches_integer_implementation():
    gen = torch.Generator().manual_seed(1)
    seeds = torch.randint(0, 2**62, (4,), generator=gen).tolist() + [0, 2**63 - 1]
    index = torch.cat(
        [torch.randint(0, 2**40, (64,), generator=gen), torch.tensor([0, 1, 2**32 - 1, 2**32])]
    )
    for seed in seeds:
        got = reference.philox(torch.tensor(seed), index).tolist()
        want = [_philox_int(seed, i) for i in index.tolist()]
        assert got == want


def test_dropout_mask_rate_and_seed_dependence():
    seed = torch.tensor(12345)
    for p in (0.1, 0.5, 0.9):
        keep = reference.dropout_mask(seed, (300, 200), p)
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 4 * ((p * (1 - p) / keep.numel()) ** 0.5) + 1e-3
    other = reference.dropout_mask(torch.tensor(12346), (300, 200), 0.5)
    assert (other != reference.dropout_mask(seed, (300, 200), 0.5)).any()
    with pytest.raises(ValueError, match="dropout_p"):
        reference.dropout_threshold(1.0)


def test_dropout_keeps_expectation():
    x = randn(400, 300, mean=2.0, dtype=torch.float64)
    y = reference.dropout(x, 0.3, torch.tensor(7))
    kept = y != 0
    assert_close(y[kept], x[kept] / 0.7, 1e-12)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.02


def test_ln_linear_reference_composes_the_documented_formula():
    x = randn(5, 7, 16, mean=3.0, dtype=torch.float64)
    lw, lb = randn(16, dtype=torch.float64), randn(16, dtype=torch.float64)
    w, b = randn(24, 16, dtype=torch.float64), randn(24, dtype=torch.float64)
    r = randn(5, 7, 24, dtype=torch.float64)
    seed = torch.tensor(99)
    out = reference.ln_linear(
        x,
        lw,
        lb,
        w,
        b,
        input_activation="silu",
        activation="gelu",
        residual=r,
        alpha=1.7,
        dropout_p=0.25,
        seed=seed,
    )
    a = torch.nn.functional.silu(x)
    mu = a.mean(-1, keepdim=True)
    var = ((a - mu) ** 2).mean(-1, keepdim=True)
    h = (a - mu) / torch.sqrt(var + 1e-5) * lw + lb
    z = torch.nn.functional.gelu(h @ w.T + b)
    keep = reference.dropout_mask(seed, (35, 24), 0.25).view(5, 7, 24)
    assert_close(out, 1.7 * r + z * keep / 0.75, 1e-12)


def test_public_ops_reject_bad_input():
    x = randn(4, 8)
    w = randn(8)
    with pytest.raises(ValueError, match="weight must have shape"):
        mk.layer_norm(x, randn(7), None)
    with pytest.raises(ValueError, match="norm must be"):
        mk.layer_norm(x, w, None, norm="batch")
    with pytest.raises(ValueError, match="bias must be None for norm='rms'"):
        mk.layer_norm(x, w, randn(8), norm="rms")
    with pytest.raises(ValueError, match="residual must have shape"):
        mk.add_layer_norm(x, randn(4, 9), w, None)
    with pytest.raises(ValueError, match="weight must have shape"):
        mk.ln_linear(x, w, None, randn(5, 9))
    with pytest.raises(ValueError, match="bias must have shape"):
        mk.ln_linear(x, w, None, randn(5, 8), randn(6))
    with pytest.raises(ValueError, match="residual must have shape"):
        mk.ln_linear(x, w, None, randn(5, 8), residual=randn(4, 8))
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.ln_linear(x, w, None, randn(5, 8), activation="tanh")
    with pytest.raises(ValueError, match="dropout_p"):
        mk.ln_linear(x, w, None, randn(5, 8), dropout_p=1.0)
    with pytest.raises(ValueError, match="weight must have x.s dtype"):
        mk.ln_linear(x, w, None, randn(5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend argument must be one of"):
        mk.layer_norm(x, w, None, backend="numpy")


def test_backend_choice(monkeypatch):
    x = randn(2, 4)
    monkeypatch.setenv(mk.ENV_VAR, "reference")
    assert resolve_backend(None, x) == "reference"
    monkeypatch.setenv(mk.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="MAGNETO_BACKEND"):
        resolve_backend(None, x)
    monkeypatch.delenv(mk.ENV_VAR)
    assert resolve_backend(None, x.double()) == "reference"
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("cpu", x.double())
    with pytest.raises(ValueError, match="cannot run on cpu"):
        resolve_backend("cuda", x)


def test_expected_backends_are_available():
    """CI builds the extension and runs the interpreter: a build that silently lost a backend
    must fail here instead of comparing the reference with itself."""
    expected = os.environ.get("MAGNETO_EXPECTED_BACKENDS", "reference,cpu,triton").split(",")
    available = mk.available_backends("cpu")
    missing = {name: available[name] for name in expected if available[name] is not None}
    assert not missing, f"expected backends unavailable: {missing}"
