"""ln_linear_group: several projections of one normalised input, every backend against the
float64 reference (outputs and every gradient; 1-4 weights of different widths, biases present or
not per projection, strided weights and x), without a gradient, its argument checks, and the
norm passes and launches it makes: one normalisation of x for the whole group, forward and
backward, whatever the number of weights."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import magneto_kernels as mk
from magneto_kernels.library import get_op
from tests.harness import (
    DTYPES,
    assert_close_to_reference,
    backend_params,
    compare_to_reference,
    randn,
    require_backend,
)

# q/k/v of a grouped-query attention is (16, 8, 8); gate/up two equal ones.
OUT_FEATURES = [(12,), (16, 16), (16, 8, 8), (8, 12, 4, 16)]
BIASES = {"nobias": lambda n: (False,) * n, "mixed": lambda n: tuple(i % 2 == 0 for i in range(n))}


def _group_fn(norm, n, with_bias, transposed=False, x_cols=None):
    """The group on the inputs of _inputs: weights given as (out, K) or, ``transposed``, as the
    transpose of a (K, out) tensor (a strided weight); x sliced to its first ``x_cols`` columns
    (a strided x) when given."""

    def fn(x, ln_weight, ln_bias, backend, **params):
        weights = [params[f"w{i}"] for i in range(n)]
        weights = [w.t() for w in weights] if transposed else weights
        biases = [params.get(f"b{i}") for i in range(n)] if any(with_bias) else None
        x = x if x_cols is None else x[..., :x_cols]
        return mk.ln_linear_group(
            x, ln_weight, ln_bias, weights, biases, eps=1e-5, norm=norm, backend=backend
        )

    return fn


def _inputs(rows, k, norm, dtype, with_bias, out_features, seed=0, transposed=False, x_cols=None):
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": randn(*rows, x_cols or k, dtype=dtype, mean=0.7, std=1.5, generator=gen),
        "ln_weight": None if norm == "none" else randn(k, dtype=dtype, mean=1.0, generator=gen),
        "ln_bias": randn(k, dtype=dtype, mean=0.2, generator=gen) if norm == "layer" else None,
    }
    for i, n in enumerate(out_features):
        shape = (k, n) if transposed else (n, k)
        inputs[f"w{i}"] = randn(*shape, dtype=dtype, std=k**-0.5, generator=gen)
        inputs[f"b{i}"] = randn(n, dtype=dtype, mean=0.1, generator=gen) if with_bias[i] else None
    return inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("biases", list(BIASES))
@pytest.mark.parametrize("out_features", OUT_FEATURES, ids=lambda o: f"{len(o)}w")
@pytest.mark.parametrize("norm", ["layer", "rms", "none"])
@pytest.mark.parametrize("backend", backend_params())
def test_group_matches_float64_reference(backend, norm, out_features, biases, dtype):
    with_bias = BIASES[biases](len(out_features))
    inputs = _inputs((3, 5), 24, norm, dtype, with_bias, out_features)
    op_norm = "layer" if norm == "none" else norm
    with backend.running():
        compare_to_reference(backend, _group_fn(op_norm, len(out_features), with_bias), inputs)


@pytest.mark.parametrize("norm", ["layer", "none"])
@pytest.mark.parametrize("backend", backend_params())
def test_group_strided_inputs_match_float64_reference(backend, norm):
    """Weights that are transposed views and an x that is a column slice of a wider tensor."""
    out_features, with_bias = (16, 8, 8), (True, False, True)
    inputs = _inputs((2, 7), 24, norm, torch.float32, with_bias, out_features, transposed=True,
                     x_cols=40)  # fmt: skip
    # the norm parameters are K = 24 wide; x's first 24 of 40 columns are the group's input
    fn = _group_fn("layer", 3, with_bias, transposed=True, x_cols=24)
    with backend.running():
        compare_to_reference(backend, fn, inputs)


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("backend", backend_params())
def test_group_without_gradient_matches_float64_reference(backend, rows):
    inputs = _inputs((rows,), 32, "rms", torch.float32, (True, True, False), (16, 8, 8))
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
        assert out.grad_fn is None
        assert_close_to_reference(out, r, s, f"output {i}")


def _train_step(backend, weights_count, grad_outputs=None, dtype=torch.float32):
    """One forward and backward of a group of ``weights_count`` weights (gradients to x, the
    norm's and every weight's parameters); ``grad_outputs``: which outputs get a gradient."""
    out_features = (8, 16, 8, 4, 12)[:weights_count]
    inputs = _inputs((2, 5), 32, "layer", torch.float32, (True,) * weights_count, out_features)
    leaves = {k: t.to(dtype).requires_grad_(True) for k, t in inputs.items() if t is not None}
    n = weights_count
    outs = mk.ln_linear_group(
        leaves["x"],
        leaves["ln_weight"],
        leaves["ln_bias"],
        [leaves[f"w{i}"] for i in range(n)],
        [leaves[f"b{i}"] for i in range(n)],
        backend=backend,
    )
    if backend != "reference":  # one autograd node for the group
        assert len({o.grad_fn for o in outs}) == 1
    chosen = range(n) if grad_outputs is None else grad_outputs
    sum(outs[i].sum() for i in chosen).backward()
    return leaves


def _native_passes(backend, weights_count):
    """The norm passes and ops the native family's group runs, from torch.profiler's events
    (csrc/backend.h names the passes)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with backend.running(), torch.profiler.profile(activities=activities) as prof:
        _train_step(backend.name, weights_count)
    return Counter(e.name for e in prof.events() if e.name.startswith("magneto::"))


@pytest.mark.parametrize("weights_count", [2, 3, 4])
@pytest.mark.parametrize(
    "backend", [p for p in backend_params(kernels_only=True) if p.id != "triton"]
)
def test_native_group_normalises_once(backend, weights_count):
    """The native family's group runs one op forward and one backward, with one norm pass
    forward and one norm backward for the whole group, whatever the number of weights (the
    cuda backend recomputes h with one more norm forward pass in the backward; the cpu backend
    does it within its norm backward pass), and no per-weight ln_linear."""
    passes = _native_passes(backend, weights_count)
    forward_passes = 2 if backend.name == "cuda" else 1
    assert passes == Counter(
        {
            "magneto::ln_linear_group_native": 1,
            "magneto::ln_linear_group_backward_native": 1,
            "magneto::norm_forward_pass": forward_passes,
            "magneto::norm_backward_pass": 1,
        }
    ), passes


@pytest.mark.parametrize("weights_count", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "backend", [p for p in backend_params(kernels_only=True) if p.id == "triton"]
)
def test_triton_group_launches(backend, weights_count, monkeypatch):
    """The triton family's group forward is two launches (the statistics, then one GEMM launch
    for up to four weights), its backward one launch for dh and one for the weight gradients
    and their bias sums (per four weights), and one norm backward for the group."""
    from magneto_kernels.triton import configs

    launched = []
    real_launch = configs.launch

    def launch(kernel, *args, **kwargs):  # every Triton kernel launches through here
        launched.append(kernel.__name__)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(configs, "launch", launch)
    with backend.running():
        _train_step(backend.name, weights_count)
    counts = Counter(launched)
    assert counts["_norm_fwd_kernel"] == 1, counts
    assert counts["_group_kernel"] == (1 if weights_count <= 4 else 2), counts
    assert counts["_norm_bwd_kernel"] == 1, counts
    launches = 1 if weights_count <= 4 else 2
    assert counts["_group_dh_kernel"] == launches, counts
    assert counts["_group_dweight_kernel"] == launches, counts
    # no per-weight GEMM or bias sum is left in the backward
    per_weight = ("_ln_matmul_kernel", "_dweight_kernel", "_linear_epilogue_backward_kernel")
    assert not any(counts[name] for name in per_weight), counts


@pytest.mark.parametrize("out_features", [(12,), (16, 8), (8, 20, 4)], ids=lambda o: f"{len(o)}w")
@pytest.mark.parametrize(
    "backend", [p for p in backend_params(kernels_only=True) if p.id == "triton"]
)
def test_triton_group_backward_of_column_slices(backend, out_features, monkeypatch):
    """The gradients of the outputs as column slices of one wider gradient (strided rows, as
    when the group's outputs are one tensor): the backward reads them in place, in one dh
    launch and one weight-gradient launch for the group, and every gradient matches float64."""
    from magneto_kernels.triton import configs

    n = len(out_features)
    with_bias = BIASES["mixed"](n)
    inputs = _inputs((2, 5), 24, "layer", torch.float32, with_bias, out_features, seed=4)
    width = sum(out_features) + 3  # wider than the outputs: no slice ends the row
    grad = randn(2, 5, width, mean=0.3, generator=torch.Generator().manual_seed(9))
    ends = torch.tensor(out_features).cumsum(0).tolist()
    slices = [grad[..., end - n_i : end] for end, n_i in zip(ends, out_features)]

    def gradients(backend_name, cast):
        leaves = {k: cast(t) for k, t in inputs.items() if t is not None}
        trained = {k: t.requires_grad_() for k, t in leaves.items() if (k, n) != ("w0", 3)}
        outs = _group_fn("layer", n, with_bias)(**leaves, backend=backend_name)
        grads = torch.autograd.grad(outs, list(trained.values()), [cast(s) for s in slices])
        return dict(zip(trained, grads))

    launched, dy_strides = [], []
    real_launch = configs.launch

    def launch(kernel, *args, **kwargs):
        launched.append(kernel.__name__)
        if kernel.__name__ in ("_group_dh_kernel", "_group_dweight_kernel"):
            dy = kwargs["DY0" if "DY0" in kwargs else "DZ0"]
            dy_strides.append(dy.stride())
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(configs, "launch", launch)
    with backend.running():
        got = gradients(backend.name, lambda t: t)
    monkeypatch.setattr(configs, "launch", real_launch)
    counts = Counter(launched)
    assert counts["_group_dh_kernel"] == 1 and counts["_group_dweight_kernel"] == 1, counts
    assert dy_strides == [(width, 1)] * 2  # the slice itself, not a contiguous copy
    same = gradients("reference", lambda t: t)
    ref64 = gradients("reference", lambda t: t.double())
    for name in got:
        assert_close_to_reference(got[name], ref64[name], same[name], name)


@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_group_gradient_of_some_outputs(backend):
    """Outputs that get no gradient add nothing to dx, and their weights get zero gradients."""
    with backend.running():
        leaves = _train_step(backend.name, 3, grad_outputs=[1])
    same = _train_step("reference", 3, grad_outputs=[1])
    ref64 = _train_step("reference", 3, grad_outputs=[1], dtype=torch.float64)
    for name, t in leaves.items():
        # the reference's autograd leaves a tensor that no used output reads without a gradient
        ref, ref_same = (r[name].grad for r in (ref64, same))
        ref = torch.zeros_like(ref64[name]) if ref is None else ref
        ref_same = torch.zeros_like(t) if ref_same is None else ref_same
        assert_close_to_reference(t.grad, ref, ref_same, name)
    assert not leaves["w0"].grad.any() and not leaves["b2"].grad.any()


@pytest.mark.parametrize("backend", backend_params())
def test_group_refuses_bad_lists(backend):
    x = torch.randn(2, 8)
    w = torch.randn(4, 8)
    with backend.running():
        with pytest.raises(ValueError, match="weights is empty"):
            mk.ln_linear_group(x, None, None, [], backend=backend.name)
        with pytest.raises(ValueError, match=r"weights\[1\] must have shape \(out_features, 8\)"):
            mk.ln_linear_group(x, None, None, [w, torch.randn(4, 6)], backend=backend.name)
        with pytest.raises(ValueError, match=r"1 biases for 2 weights"):
            mk.ln_linear_group(x, None, None, [w, w], [None], backend=backend.name)
        with pytest.raises(ValueError, match=r"biases\[1\] must have shape \(4,\)"):
            mk.ln_linear_group(x, None, None, [w, w], [None, torch.randn(5)], backend=backend.name)
        with pytest.raises(TypeError, match="weights must be a list of Tensors, got int"):
            mk.ln_linear_group(x, None, None, [w, 3], backend=backend.name)
        with pytest.raises(TypeError, match="concat must be a bool, got int"):
            mk.ln_linear_group(x, None, None, [w, w], concat=1, backend=backend.name)


@pytest.mark.parametrize(
    "op, rows_as",
    [
        ("ln_linear_group", (9,)),
        ("ln_linear_group", (3, 3)),
        ("ln_linear_group_concat", (3, 3)),
        ("ln_linear_group_backward", (9,)),
        ("ln_linear_group_backward", (3, 3)),
    ],
    ids=str,
)
@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_group_opcheck(backend, rows_as, op):
    """The group's ops as registered (schema, fake impl, autograd registration), with the rows
    given as one dimension and as two; ln_linear_group_concat: the forward with concat=True
    (one output, no aliasing)."""
    with backend.running():
        dev, family = backend.device, backend.family
        gen = torch.Generator().manual_seed(3)
        x = randn(*rows_as, 24, mean=0.5, generator=gen, device=dev)
        lw, lb = (
            randn(24, mean=1.0, generator=gen, device=dev),
            randn(24, generator=gen, device=dev),
        )
        ws = [randn(n, 24, std=0.2, generator=gen, device=dev) for n in (10, 6)]
        bs = [randn(10, generator=gen, device=dev), None]
        _, mean, rstd = get_op("ln_linear_group", family)(x, lw, lb, ws, bs, 1e-5, "layer")
        if op != "ln_linear_group_backward":
            x, lw, lb = (t.requires_grad_() for t in (x, lw, lb))
            ws = [w.requires_grad_() for w in ws]
            bs = [bs[0].requires_grad_(), None]
            concat = op == "ln_linear_group_concat"
            args = (x, lw, lb, ws, bs, 1e-5, "layer", "none", None, concat)
            op = "ln_linear_group"
        else:
            dy = [randn(*rows_as, 10, generator=gen, device=dev), None]
            mask = [True, True, True, True, True, True, False]
            args = (dy, x, lw, lb, ws, mean, rstd, "layer", mask)
        torch.library.opcheck(get_op(op, family), args)


@pytest.mark.parametrize("backend", backend_params())
def test_group_under_autocast(backend):
    """torch.autocast casts x, the weights and the biases to the autocast dtype (a linear) and
    the norm parameters to float32, as for ln_linear; gradients reach the float32 tensors."""
    inputs = _inputs((4,), 16, "rms", torch.float32, (True, False), (8, 4))
    x = inputs["x"].requires_grad_()
    weights = [inputs["w0"].requires_grad_(), inputs["w1"]]
    biases = [inputs["b0"], None]
    with backend.running(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        outs = mk.ln_linear_group(x, inputs["ln_weight"], None, weights, biases, norm="rms",
                                  backend=backend.name)  # fmt: skip
    # the reference on the autocast-cast inputs, in bfloat16 and in float64
    with torch.no_grad():
        low = [t.to(torch.bfloat16) for t in (x, *weights, biases[0])]
        refs = [
            mk.ln_linear_group(
                cast(low[0]),
                inputs["ln_weight"].to(dt),
                None,
                [cast(w) for w in low[1:3]],
                [cast(low[3]), None],
                norm="rms",
                backend="reference",
            )  # fmt: skip
            for dt, cast in ((torch.float32, lambda t: t), (torch.float64, lambda t: t.double()))
        ]
    assert [o.dtype for o in outs] == [torch.bfloat16] * 2
    for i, (out, same, ref64) in enumerate(zip(outs, *refs)):
        assert_close_to_reference(out, ref64, same, f"output {i}")
    sum(o.float().sum() for o in outs).backward()
    assert x.grad.dtype == torch.float32 and weights[0].grad.dtype == torch.float32


# --------------------------------------------------------------------------------- concat=True


def _concat_fn(norm, n):
    def fn(x, ln_weight, ln_bias, backend, **params):
        return mk.ln_linear_group(
            x, ln_weight, ln_bias, [params[f"w{i}"] for i in range(n)],
            [params.get(f"b{i}") for i in range(n)], eps=1e-5, norm=norm, concat=True,
            backend=backend,
        )  # fmt: skip

    return fn


@pytest.mark.parametrize(
    "dtype, out_features",
    [(torch.float32, (16, 16)), (torch.float32, (16, 8, 8)), (torch.float32, (8, 12, 4, 16, 6))]
    + [(dtype, (16, 8)) for dtype in DTYPES if dtype != torch.float32],
    ids=lambda v: str(v) if isinstance(v, torch.dtype) else f"{len(v)}w",
)
@pytest.mark.parametrize("norm", ["layer", "rms", "none"])
@pytest.mark.parametrize("backend", backend_params())
def test_group_concat_matches_list_and_float64_reference(backend, norm, out_features, dtype):
    """concat=True: one (*, Σ n_i) output, the list form side by side bit for bit (each
    projection written into its columns; five weights: two Triton launches into one output),
    and the forward and every gradient (the one gradient read column range by column range)
    against the float64 reference."""
    n = len(out_features)
    with_bias = tuple(i % 2 == 0 for i in range(n))
    inputs = _inputs((3, 5), 24, norm, dtype, with_bias, out_features)
    op_norm = "layer" if norm == "none" else norm
    with backend.running():
        compare_to_reference(backend, _concat_fn(op_norm, n), inputs)
        with torch.no_grad():
            cat = _concat_fn(op_norm, n)(backend=backend.name, **inputs)
            outs = _group_fn(op_norm, n, with_bias)(backend=backend.name, **inputs)
    assert cat.shape == (3, 5, sum(out_features))
    assert torch.equal(cat, torch.cat(outs, dim=-1))


@pytest.mark.parametrize("layout", ["transposed", "column_slice"])
@pytest.mark.parametrize("backend", backend_params())
def test_group_concat_non_contiguous_gradient(backend, layout):
    """The concat output's gradient given transposed or as a column range of a wider tensor
    (the backward reads each weight's columns with its row stride, or a contiguous copy where
    the columns are strided): every gradient against the float64 reference."""
    out_features, with_bias = (16, 8, 8), (True, False, True)
    inputs = _inputs((6,), 24, "rms", torch.float32, with_bias, out_features)
    cols = sum(out_features)
    gen = torch.Generator().manual_seed(7)
    if layout == "transposed":
        dy = randn(cols, 6, mean=0.3, generator=gen).t()
    else:
        dy = randn(6, cols + 5, mean=0.3, generator=gen)[:, 3 : 3 + cols]
    assert not dy.is_contiguous()

    def grads(name, cast):
        leaves = {
            k: None if t is None else cast(t).detach().clone().requires_grad_()
            for k, t in inputs.items()
        }
        out = _concat_fn("rms", 3)(backend=name, **leaves)
        wanted = [t for t in leaves.values() if t is not None]
        return torch.autograd.grad(out, wanted, cast(dy))

    d = backend.device
    with backend.running():
        got = grads(backend.name, lambda t: t.to(d))
    same = grads("reference", lambda t: t)
    ref64 = grads("reference", lambda t: t.double())
    for i, (g, s, r) in enumerate(zip(got, same, ref64)):
        assert_close_to_reference(g.cpu(), r, s, f"grad {i}")


_ROW_BLOCKED_SCRIPT = """
import sys, torch, magneto_kernels as mk
g = torch.Generator().manual_seed(0)
x = torch.randn(1000, 300, generator=g) + 0.5
lw, ws = torch.randn(300, generator=g) + 1.0, [torch.randn(n, 300, generator=g) for n in (24, 16)]
args = (x, lw, None, ws, [torch.randn(24, generator=g), None])
runs = {
    "list": mk.ln_linear_group(*args, norm="rms", backend="cpu"),
    "cat": mk.ln_linear_group(*args, norm="rms", concat=True, backend="cpu"),
    "same": mk.ln_linear_group(*args, norm="rms", concat=True, backend="reference"),
    "ref64": mk.ln_linear_group(
        *(None if a is None else a.double() for a in args[:3]), [w.double() for w in ws],
        [args[4][0].double(), None], norm="rms", concat=True, backend="reference"),
}
torch.save(runs, sys.argv[1])
"""


def test_cpu_group_concat_row_blocked_forward(tmp_path):
    """The cpu backend's row-blocked forward (h through a 1 MiB workspace in two blocks, a
    process of its own): each block's GEMMs accumulate into column ranges of the one output,
    started as the biases."""
    require_backend("cpu")
    path = tmp_path / "runs.pt"
    env = dict(os.environ, OMP_NUM_THREADS="2", MAGNETO_CPU_WORKSPACE_MB="1")
    proc = subprocess.run(
        [sys.executable, "-c", _ROW_BLOCKED_SCRIPT, str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = torch.load(path)
    assert torch.equal(runs["cat"], torch.cat(runs["list"], dim=-1))
    assert_close_to_reference(runs["cat"], runs["ref64"], runs["same"], "output")
