"""The op families' sharded-norm entry points (docs/design.md, The op contract): ``norm_stats``,
``ln_linear`` with given (mean, rstd), ``ln_linear_backward_partial`` and ``layer_norm_backward``
with ``input_activation`` and ``row_means``.

Most tests need no gloo world: the row's features are split into shards in one process, each
shard runs the entry points and the collectives are simulated (Chan's combine of the shards'
(mean, M2), the sum of their row sums), so the composition is ``N(in_act(x)) @ W^T`` of the whole
row; its output and every gradient are held to the float64 reference of the unsharded op within
twice PyTorch's own error in the same dtype, on every family (cuda under MAGNETO_CUDA_EMULATE=1
or on a GPU). The gloo tests of magneto/parallel
(tests/test_tensor_parallel.py) run the same path over real collectives and count it.
"""

import pytest
import torch
from harness import BY_NAME, GPU, assert_close_to_reference, randn, require_backend

import magneto_kernels
from magneto.parallel import functional
from magneto.parallel.functional import chan_combine
from magneto_kernels.library import get_op

EPS = 1e-5
ROWS, K, N = 5, 24, 7
FUSED = [
    pytest.param(b, id=b, marks=[GPU] if BY_NAME[b].gpu else [])
    for b in ("reference", "cpu", "triton", "cuda")
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [
    # (norm, input_activation, mean of x)
    ("layer", "none", 0.0),
    ("layer", "none", 30.0),
    ("layer", "gelu", 1.0),
    ("layer", "swiglu", 0.5),
    ("rms", "none", 3.0),
    ("rms", "relu2_glu", 0.5),
]


def _inputs(norm, act, mean, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    width = 2 * K if act in ("swiglu", "relu2_glu") else K
    x = randn(ROWS, width, dtype=dtype, mean=mean, generator=g, device=device)
    ln_weight = randn(K, dtype=dtype, mean=1.0, std=0.1, generator=g, device=device)
    ln_bias = randn(K, dtype=dtype, std=0.1, generator=g, device=device)
    weight = randn(N, K, dtype=dtype, std=K**-0.5, generator=g, device=device)
    dout = randn(ROWS, N, dtype=torch.float64, mean=0.3, generator=g, device=device)
    return x, ln_weight, ln_bias if norm == "layer" else None, weight, dout


def _shard(t, shards, s, gated, dim=-1):
    """Shard s of t's features: for a gated x = [gate | up], [gate_s | up_s]."""
    if t is None:
        return None
    if gated:
        gate, up = t.chunk(2, dim)
        return torch.cat([gate.chunk(shards, dim)[s], up.chunk(shards, dim)[s]], dim)
    return t.chunk(shards, dim)[s].contiguous()


def _unshard(parts, gated):
    if gated:
        gates, ups = zip(*(p.chunk(2, -1) for p in parts))
        return torch.cat([*gates, *ups], -1)
    return torch.cat(parts, -1)


def _sharded(backend, x, ln_weight, ln_bias, weight, dout, norm, act, shards):
    """(out, dx, dln_weight, dln_bias, dweight) of N(in_act(x)) @ weight^T with the features in
    ``shards`` shards, each through backend's entry points, the collectives simulated."""
    norm_stats, ln_linear, backward_partial, norm_backward = functional._entry_points(backend)
    gated = act in ("swiglu", "relu2_glu")
    xs = [_shard(x, shards, s, gated) for s in range(shards)]
    lws = [_shard(ln_weight, shards, s, False) for s in range(shards)]
    lbs = [_shard(ln_bias, shards, s, False) for s in range(shards)]
    ws = [_shard(weight, shards, s, False) for s in range(shards)]
    count = K // shards
    stats = [norm_stats(xs[s], norm, act) for s in range(shards)]
    if norm == "layer":
        mean, m2 = chan_combine(
            torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats]), count
        )
    else:
        mean, m2 = stats[0][0], sum(v for _, v in stats)
    rstd = torch.rsqrt(m2 / K + EPS)
    given = (None, None, None, EPS, norm, act, "none", 1.0, 0.0, "none", None, mean, rstd)
    out = sum(ln_linear(xs[s], lws[s], lbs[s], ws[s], *given) for s in range(shards))
    dout = dout.to(x.dtype)
    halves = [
        backward_partial(
            dout,
            xs[s],
            lws[s],
            lbs[s],
            ws[s],
            mean,
            rstd,
            x.new_empty((0,)),
            None,
            norm,
            act,
            "none",
            0.0,
            [True, True, False],
            "none",
        )  # fmt: skip
        for s in range(shards)
    ]
    row_means = sum(h[1] for h in halves) / K
    grads = [
        norm_backward(
            halves[s][0],
            xs[s],
            lws[s],
            lbs[s],
            mean,
            rstd,
            None,
            norm,
            [True, True, True],
            act,
            row_means,
        )  # fmt: skip
        for s in range(shards)
    ]
    dx = _unshard([g[0] for g in grads], gated)
    dlw = torch.cat([g[1] for g in grads])
    dlb = torch.cat([g[2] for g in grads]) if ln_bias is not None else None
    dw = torch.cat([h[2] for h in halves], 1)
    return out, dx, dlw, dlb, dw


def _unsharded(x, ln_weight, ln_bias, weight, dout, norm, act):
    """The same five by the public op on the reference backend, differentiated by autograd."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, ln_weight)]
    lb = None if ln_bias is None else ln_bias.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = magneto_kernels.ln_linear(
        leaves[0], leaves[1], lb, w, eps=EPS, norm=norm, input_activation=act, backend="reference"
    )
    wanted = [leaves[0], leaves[1], *([lb] if lb is not None else []), w]
    grads = list(torch.autograd.grad(out, wanted, dout.to(out.dtype)))
    dlb = grads.pop(2) if lb is not None else None
    return out.detach(), grads[0], grads[1], dlb, grads[2]


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("backend", FUSED)
def test_shards_composed_match_the_unsharded_op(backend, case, dtype, shards):
    """The two forward entry points and the two backward halves of every shard, composed with a
    simulated reduction, are the unsharded op: output and every gradient against float64."""
    require_backend(backend, BY_NAME[backend].device)
    norm, act, mean = case
    inputs = _inputs(norm, act, mean, DTYPES[dtype], BY_NAME[backend].device)
    got = _sharded(backend, *inputs, norm, act, shards)
    same = _unsharded(*inputs, norm, act)
    ref64 = _unsharded(*(None if t is None else t.double() for t in inputs), norm, act)
    names = ("output", "dx", "dln_weight", "dln_bias", "dweight")
    for name, out, s, r in zip(names, got, same, ref64):
        if r is None:
            continue
        scale = ROWS**0.5 if r.dim() == 1 else 1.0
        assert_close_to_reference(out, r, s, f"{backend} {name}", atol=1e-6 * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("backend", FUSED)
def test_norm_stats_against_float64(backend, case, dtype):
    """norm_stats: the shard's mean and M2 (sum of squares for RMSNorm) of in_act(x)."""
    require_backend(backend, BY_NAME[backend].device)
    norm, act, mean = case
    x = _inputs(norm, act, mean, DTYPES[dtype], BY_NAME[backend].device)[0]
    norm_stats = functional._entry_points(backend)[0]
    got = norm_stats(x, norm, act)
    same = magneto_kernels.reference.norm_stats(x, norm, act)
    ref64 = magneto_kernels.reference.norm_stats(x.double(), norm, act)
    assert got[0].shape == ((ROWS,) if norm == "layer" else (0,))
    for name, out, s, r in zip(("mean", "m2"), got, same, ref64):
        assert_close_to_reference(out, r, s, f"{backend} {name}")


def _opcheck_cases(dev):
    x, lw, lb, w, dout = _inputs("layer", "gelu", 1.0, torch.float32)
    mean, m2 = get_op("norm_stats", "native")(x, "layer", "gelu")
    rstd = torch.rsqrt(m2 / K + EPS)
    dh = randn(ROWS, K, device=dev)
    row_means = randn(ROWS, 2, device=dev)
    return {
        "norm_stats": (x, "layer", "gelu"),
        "ln_linear": (
            x, lw, lb, w, None, None, None, EPS, "layer", "gelu", "none", 1.0, 0.0, "none", None,
            mean, rstd,
        ),
        "ln_linear_backward_partial": (
            dout.float(), x, lw, lb, w, mean, rstd, x.new_empty((0,)), None, "layer", "gelu",
            "none", 0.0, [True, True, True],
        ),
        "layer_norm_backward": (
            dh, x, lw, lb, mean, rstd, None, "layer", [True, True, True], "gelu", row_means,
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "op", ["norm_stats", "ln_linear", "ln_linear_backward_partial", "layer_norm_backward"]
)
def test_opcheck(op):
    """The entry points as registered (schema, fake impl, dispatch) on the native family."""
    require_backend("cpu")
    torch.library.opcheck(get_op(op, "native"), _opcheck_cases("cpu")[op])


def test_given_statistics_have_no_autograd_formula():
    """ln_linear with given statistics records no graph: its gradient needs the collectives."""
    require_backend("cpu")
    args = list(_opcheck_cases("cpu")["ln_linear"])
    args[0] = args[0].detach().requires_grad_()
    with pytest.raises(NotImplementedError, match="given mean and rstd has no autograd"):
        get_op("ln_linear", "native")(*args)


@pytest.mark.parametrize(
    "op,message",
    [
        ("ln_linear", "mean and rstd must be given together"),
        ("layer_norm_backward", r"row_means must have shape \(5, 2\)"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_argument_errors(backend, op, message):
    """The same error, word for word, on every family (checks.py and csrc/checks.cpp)."""
    require_backend(backend)
    args = list(_opcheck_cases("cpu")[op])
    if op == "ln_linear":
        args[-1] = None
        entry = functional._entry_points(backend)[1]
    else:
        args[-1] = args[-1][:, :1]
        entry = functional._entry_points(backend)[3]
    with pytest.raises(ValueError, match=message):
        entry(*args)
