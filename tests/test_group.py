"""ln_linear_group: several projections of one normalised input, every backend against the
float64 reference (outputs and every gradient), the decode path without a gradient, and the
group's input gradient computed by one backward op call (summed inside the op)."""

from __future__ import annotations

import pytest
import torch

import magneto_kernels as mk
from magneto_kernels import group
from tests.harness import (
    DTYPES,
    assert_close_to_reference,
    backend_params,
    compare_to_reference,
    randn,
)

OUT_FEATURES = (16, 8, 8)  # q/k/v of a grouped-query attention; gate/up is two equal ones


def _group_fn(norm, n, with_bias):
    def fn(x, ln_weight, ln_bias, backend, **params):
        weights = [params[f"w{i}"] for i in range(n)]
        biases = [params.get(f"b{i}") for i in range(n)] if any(with_bias) else None
        return mk.ln_linear_group(
            x, ln_weight, ln_bias, weights, biases, eps=1e-5, norm=norm, backend=backend
        )

    return fn


def _inputs(rows, k, norm, dtype, with_bias, out_features=OUT_FEATURES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": randn(*rows, k, dtype=dtype, mean=0.7, std=1.5, generator=gen),
        "ln_weight": None if norm == "none" else randn(k, dtype=dtype, mean=1.0, generator=gen),
        "ln_bias": randn(k, dtype=dtype, mean=0.2, generator=gen) if norm == "layer" else None,
    }
    for i, n in enumerate(out_features):
        inputs[f"w{i}"] = randn(n, k, dtype=dtype, std=k**-0.5, generator=gen)
        inputs[f"b{i}"] = randn(n, dtype=dtype, mean=0.1, generator=gen) if with_bias[i] else None
    return inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [(False,) * 3, (True, False, True)], ids=["nobias", "bias"])
@pytest.mark.parametrize("norm", ["layer", "rms", "none"])
@pytest.mark.parametrize("backend", backend_params())
def test_group_matches_float64_reference(backend, norm, with_bias, dtype):
    inputs = _inputs((3, 5), 24, norm, dtype, with_bias)
    op_norm = "layer" if norm == "none" else norm
    with backend.running():
        compare_to_reference(backend, _group_fn(op_norm, 3, with_bias), inputs)


@pytest.mark.parametrize("rows", [1, 3, 40])  # below in_features: one call per weight
@pytest.mark.parametrize("backend", backend_params())
def test_group_without_gradient_matches_float64_reference(backend, rows):
    inputs = _inputs((rows,), 32, "rms", torch.float32, (True, True, False))
    weights = [inputs[f"w{i}"] for i in range(3)]
    biases = [inputs[f"b{i}"] for i in range(3)]
    args = (inputs["x"], inputs["ln_weight"], None)
    with backend.running(), torch.no_grad():
        outs = mk.ln_linear_group(*args, weights, biases, norm="rms", backend=backend.name)
        same = mk.ln_linear_group(*args, weights, biases, norm="rms", backend="reference")
        ref64 = mk.ln_linear_group(
            *(None if t is None else t.double() for t in args),
            [w.double() for w in weights],
            [None if b is None else b.double() for b in biases],
            norm="rms",
            backend="reference",
        )
    assert len(outs) == 3
    for i, (out, s, r) in enumerate(zip(outs, same, ref64)):
        assert_close_to_reference(out, r, s, f"output {i}")


@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_group_backward_is_one_norm_backward(backend, monkeypatch):
    """The input gradient of the whole group comes from one norm backward of the family: one
    autograd node for every output, the projections' input gradients summed before it (not
    accumulated by autograd after one norm backward each)."""
    calls = []
    real = group.get_op

    def counting(op, family):
        calls.append(op)
        return real(op, family)

    monkeypatch.setattr(group, "get_op", counting)
    inputs = _inputs((2, 4), 16, "layer", torch.float32, (False, False, False), (8, 8))
    x = inputs["x"].requires_grad_(True)
    weights = [inputs["w0"].requires_grad_(True), inputs["w1"].requires_grad_(True)]
    with backend.running():
        outs = mk.ln_linear_group(
            x, inputs["ln_weight"], inputs["ln_bias"], weights, backend=backend.name
        )
        assert outs[0].grad_fn is not None and outs[0].grad_fn is outs[1].grad_fn
        sum(o.sum() for o in outs).backward()
    assert calls == ["layer_norm", "layer_norm_backward"]
    assert x.grad is not None and all(w.grad is not None for w in weights)


def test_group_refuses_bad_lists():
    x = torch.randn(2, 8)
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="empty"):
        mk.ln_linear_group(x, None, None, [])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        mk.ln_linear_group(x, None, None, [w, torch.randn(4, 6)])
    with pytest.raises(ValueError, match="biases"):
        mk.ln_linear_group(x, None, None, [w, w], [None])
