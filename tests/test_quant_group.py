"""ln_linear_group's quantised modes (``quant=``, BitNet's q/k/v and gate/up: the row normalised
and quantised once for every weight) on every backend that has them (``quant.BACKENDS``): the
offline modes against the float64 evaluation of transformers' formula per weight (one code of
difference only at ties flagged by ``quant.float64_codes``) and bit for bit against one
quantised ``ln_linear`` per weight; the online mode's outputs and every gradient against the
reference, and against one ``ln_linear`` per weight (dx summed); bad arguments refused alike;
the offline modes without a backward."""

from __future__ import annotations

import re

import pytest
import torch

from magneto_kernels import ops, quant
from magneto_kernels.codes import QUANT_PACK_UNIT, RTOL
from magneto_kernels.library import get_op
from tests.harness import (
    ATOL,
    ELEMENT_RTOL_FACTOR,
    assert_close,
    assert_elementwise,
    backend_params,
    compare_to_reference,
    randn,
)
from tests.test_quant_op import EPS, K, _backends, _float64_offline, _ternary

OUT_FEATURES = (48, 16, 16)  # q/k/v of a grouped-query attention, scaled down
HAS_BIAS = (True, False, True)


def _offline_case(rows, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(rows, K, dtype=dtype, mean=0.3, std=1.2, generator=gen)
    ln_weight = randn(K, dtype=dtype, mean=1.0, std=0.2, generator=gen)
    ts = [_ternary(n, K, gen) for n in OUT_FEATURES]
    biases = [
        randn(n, dtype=dtype, mean=0.1, std=0.5, generator=gen) if b else None
        for n, b in zip(OUT_FEATURES, HAS_BIAS)
    ]
    weight_scales = torch.tensor([0.37, 1.9, 0.81], dtype=dtype)
    return x, ln_weight, ts, biases, weight_scales


def _to(t, device):
    return None if t is None else t.to(device)


def _run_group(backend, x, ln_weight, ts, biases, weight_scales, mode):
    d = backend.device
    outs = ops.ln_linear_group(
        x.to(d), _to(ln_weight, d), None, [quant.pack(t).to(d) for t in ts],
        [None if b is None else b.to(d) for b in biases], eps=EPS, norm="rms", quant=mode,
        weight_scales=weight_scales.to(d), backend=backend.name,
    )  # fmt: skip
    return [o.cpu() for o in outs]


def _run_each(backend, x, ln_weight, ts, biases, weight_scales, mode):
    d = backend.device
    return [
        ops.ln_linear(
            x.to(d),
            _to(ln_weight, d),
            None,
            quant.pack(t).to(d),
            None if b is None else b.to(d),
            eps=EPS,
            norm="rms",
            quant=mode,
            weight_scale=weight_scales[i : i + 1].to(d),
            backend=backend.name,
        ).cpu()
        for i, (t, b) in enumerate(zip(ts, biases))
    ]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mode", quant.OFFLINE_MODES)
@pytest.mark.parametrize("rows", (1, 17))
def test_offline_group_matches_float64_up_to_ties(backend, mode, rows):
    x, ln_weight, ts, biases, weight_scales = _offline_case(rows, torch.float32, rows)
    with backend.running():
        outs = _run_group(backend, x, ln_weight, ts, biases, weight_scales, mode)
    for i, (out, t, b) in enumerate(zip(outs, ts, biases)):
        n = t.shape[0]
        ref, slack = _float64_offline(
            x, ln_weight, t, torch.zeros(n) if b is None else b, torch.zeros(rows, n),
            weight_scales[i : i + 1], mode, False,
        )  # fmt: skip
        err = ((out.double() - ref).abs() - slack).clamp(min=0)
        bound = ELEMENT_RTOL_FACTOR * RTOL[torch.float32] * ref.abs().max().item()
        assert_elementwise(err, ref, bound, ATOL, f"output {i}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mode", quant.OFFLINE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_offline_group_is_one_ln_linear_per_weight_bitwise(backend, mode, dtype):
    """The same codes and the same integer projection per weight: the same bits."""
    case = _offline_case(9, dtype, 4)
    with backend.running():
        group = _run_group(backend, *case, mode)
        each = _run_each(backend, *case, mode)
    for i, (g, e) in enumerate(zip(group, each)):
        assert torch.equal(g, e), f"output {i}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mode", quant.OFFLINE_MODES)
def test_offline_group_without_norm_is_one_ln_linear_per_weight_bitwise(backend, mode):
    """No norm: x's own rows quantised once (the cpu backend reads x in place, no h)."""
    x, _, ts, biases, weight_scales = _offline_case(6, torch.float32, 8)
    case = (x, None, ts, biases, weight_scales)
    with backend.running():
        group = _run_group(backend, *case, mode)
        each = _run_each(backend, *case, mode)
    for i, (g, e) in enumerate(zip(group, each)):
        assert torch.equal(g, e), f"output {i}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mode", quant.OFFLINE_MODES)
@pytest.mark.parametrize("rows", (3, 17), ids=["few_rows", "tiled"])
def test_offline_group_concat_is_the_list_side_by_side_bitwise(backend, mode, rows):
    """concat=True: one (rows, Σ n_i) output, each projection written into its columns (the
    kernels' output row stride), the list form's bits; bfloat16 at 17 rows (the tiled kernel's
    row stores)."""
    dtype = torch.bfloat16 if rows == 17 else torch.float32
    x, ln_weight, ts, biases, weight_scales = _offline_case(rows, dtype, 6)
    d = backend.device
    args = (
        x.to(d), ln_weight.to(d), None, [quant.pack(t).to(d) for t in ts],
        [None if b is None else b.to(d) for b in biases],
    )  # fmt: skip
    kw = dict(eps=EPS, norm="rms", quant=mode, weight_scales=weight_scales.to(d))
    with backend.running():
        outs = ops.ln_linear_group(*args, **kw, backend=backend.name)
        cat = ops.ln_linear_group(*args, **kw, concat=True, backend=backend.name)
    assert cat.shape == (rows, sum(OUT_FEATURES))
    assert torch.equal(cat, torch.cat(outs, dim=-1))


def _online_fn(n, norm, concat=False):
    def fn(x, ln_weight, backend, **params):
        return ops.ln_linear_group(
            x, ln_weight, None, [params[f"w{i}"] for i in range(n)],
            [params.get(f"b{i}") for i in range(n)], eps=EPS, norm=norm, quant="bitnet_online",
            concat=concat, backend=backend,
        )  # fmt: skip

    return fn


def _online_inputs(rows, with_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": randn(2, rows, K, mean=0.3, generator=gen),
        "ln_weight": randn(K, mean=1.0, std=0.2, generator=gen) if with_norm else None,
    }
    for i, (n, b) in enumerate(zip(OUT_FEATURES, HAS_BIAS)):
        inputs[f"w{i}"] = randn(n, K, std=0.05, generator=gen)
        inputs[f"b{i}"] = randn(n, mean=0.1, generator=gen) if b else None
    return inputs


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("with_norm", [True, False], ids=["rms", "nonorm"])
@pytest.mark.parametrize("rows", (1, 7))
def test_online_group_forward_and_every_gradient(backend, with_norm, rows):
    inputs = _online_inputs(rows, with_norm, rows)
    with backend.running():
        compare_to_reference(
            backend, _online_fn(len(OUT_FEATURES), "rms"),
            {k: None if v is None else v.to(backend.device) for k, v in inputs.items()},
        )  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
def test_online_group_concat_forward_and_every_gradient(backend):
    """concat=True online: the list form's bits forward, every gradient (the one output's
    gradient read column range by column range) against the float64 reference."""
    inputs = {k: None if v is None else v.to(backend.device)
              for k, v in _online_inputs(5, True, 3).items()}  # fmt: skip
    n = len(OUT_FEATURES)
    with backend.running():
        compare_to_reference(backend, _online_fn(n, "rms", concat=True), inputs)
        with torch.no_grad():
            cat = _online_fn(n, "rms", concat=True)(backend=backend.name, **inputs)
            outs = _online_fn(n, "rms")(backend=backend.name, **inputs)
    assert torch.equal(cat, torch.cat(outs, dim=-1))


@pytest.mark.parametrize("backend", _backends())
def test_online_group_is_one_ln_linear_per_weight(backend):
    """Outputs and gradients as one online ln_linear per weight, dx and dln_weight summed over
    them (the group sums dh before its one norm backward: a rounding apart)."""
    inputs = {
        k: None if v is None else v.to(backend.device).requires_grad_()
        for k, v in _online_inputs(6, True, 11).items()
    }
    n = len(OUT_FEATURES)
    weights = [inputs[f"w{i}"] for i in range(n)]
    biases = [inputs[f"b{i}"] for i in range(n)]
    leaves = [inputs["x"], inputs["ln_weight"], *weights, *(b for b in biases if b is not None)]
    gen = torch.Generator().manual_seed(5)
    with backend.running():
        group = _online_fn(n, "rms")(backend=backend.name, **inputs)
        each = [
            ops.ln_linear(
                inputs["x"],
                inputs["ln_weight"],
                None,
                w,
                b,
                eps=EPS,
                norm="rms",
                quant="bitnet_online",
                backend=backend.name,
            )
            for w, b in zip(weights, biases)
        ]
        dys = [randn(*o.shape, mean=0.3, generator=gen).to(backend.device) for o in group]
        grads_group = torch.autograd.grad(group, leaves, dys)
        grads_each = torch.autograd.grad(each, leaves, dys)
    for i, (g, e) in enumerate(zip(group, each)):
        assert torch.equal(g, e), f"output {i}"
    for i, (g, e) in enumerate(zip(grads_group, grads_each)):
        assert_close(g, e, RTOL[torch.float32], ATOL, name=f"grad {i}")


def _bad_call(backend, change):
    d = backend.device
    mode = change.get("quant", "bitnet_offline")
    k = K
    x = randn(3, k, device=d)
    weights = [torch.zeros(16, k // 4, dtype=torch.uint8, device=d) for _ in range(2)]
    if "weight_cols" in change:
        weights[1] = torch.zeros(16, change["weight_cols"], dtype=torch.uint8, device=d)
    if mode == "bitnet_online":
        weights = [randn(16, k, device=d) for _ in range(2)]
    scales = change.get("weight_scales", torch.ones(2))
    ops.ln_linear_group(
        x, torch.ones(k, device=d), None, weights, norm=change.get("norm", "rms"), quant=mode,
        weight_scales=None if scales is None else scales.to(d), backend=backend.name,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, error",
    [
        ({"weight_cols": 16}, "weights[1] must have shape (out_features, 64) for quant="),
        ({"weight_scales": None}, "needs weight_scales, a tensor of shape (2,): one per weight"),
        ({"weight_scales": torch.ones(3)}, "weight_scales must have shape (2,), got (3,)"),
        ({"quant": "bitnet_online"}, "weight_scales must be None for quant='bitnet_online'"),
        ({"norm": "layer"}, "quant='bitnet_offline' takes norm='rms' or no norm (BitNet's)"),
        ({"quant": "int4"}, "quant must be one of 'none', 'bitnet_online'"),
    ],
)
@pytest.mark.parametrize("backend", _backends())
def test_bad_arguments_refused_alike(backend, change, error):
    with (
        backend.running(),
        pytest.raises(ValueError, match=re.escape(error)),
    ):
        _bad_call(backend, change)


@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_offline_group_has_no_backward(backend):
    if backend.name not in quant.BACKENDS:
        pytest.skip(f"{backend.name} has no quantised kernels (its refusal: test_quant_op.py)")
    gen = torch.Generator().manual_seed(1)
    d = backend.device
    with backend.running():
        x = randn(2, K, generator=gen).to(d).requires_grad_()
        outs = ops.ln_linear_group(
            x, None, None, [quant.pack(_ternary(16, K, gen)).to(d)], quant="bitnet_offline",
            weight_scales=torch.ones(1, device=d), backend=backend.name,
        )  # fmt: skip
        with pytest.raises(NotImplementedError, match="ln_linear_group: .* has no backward"):
            outs[0].sum().backward()


@pytest.mark.parametrize(
    "op, mode, concat",
    [
        ("ln_linear_group", "bitnet_online", False),
        ("ln_linear_group", "bitnet_offline", False),
        ("ln_linear_group", "bitlinear", False),
        ("ln_linear_group", "bitnet_online", True),
        ("ln_linear_group", "bitnet_offline", True),
        ("ln_linear_group_backward", "bitnet_online", False),
    ],
)
@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_quant_group_opcheck(backend, op, mode, concat):
    """The quantised group's ops as registered (schema, fake impl, autograd registration), rows
    given as two dimensions; the forward also with its one concat output."""
    if backend.name not in quant.BACKENDS:
        pytest.skip(f"{backend.name} has no quantised kernels (its refusal: test_quant_op.py)")
    with backend.running():
        dev, family = backend.device, backend.family
        gen = torch.Generator().manual_seed(3)
        k = QUANT_PACK_UNIT
        x = randn(3, 3, k, mean=0.5, generator=gen, device=dev)
        lw = randn(k, mean=1.0, generator=gen, device=dev)
        if mode == "bitnet_online":
            ws = [randn(n, k, std=0.2, generator=gen, device=dev) for n in (10, 6)]
            scales = None
        else:
            ws = [quant.pack(_ternary(n, k, gen)).to(dev) for n in (10, 6)]
            scales = torch.tensor([0.5, 2.0], device=dev)
        bs = [randn(10, generator=gen, device=dev), None]
        group = get_op("ln_linear_group", family)
        _, mean, rstd = group(x, lw, None, ws, bs, EPS, "rms", mode, scales)
        if op == "ln_linear_group":
            if mode == "bitnet_online":
                x, lw = x.requires_grad_(), lw.requires_grad_()
                ws = [w.requires_grad_() for w in ws]
            args = (x, lw, None, ws, bs, EPS, "rms", mode, scales, concat)
        else:
            dy = [randn(3, 3, 10, generator=gen, device=dev), None]
            mask = [True, True, False, True, True, True, False]
            args = (dy, x, lw, None, ws, mean, rstd, "rms", mask, mode)
        torch.library.opcheck(get_op(op, family), args)
