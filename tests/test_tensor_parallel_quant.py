"""BitNet's quantised projections under tensor parallelism (docs/design.md, Tensor parallelism):
``ln_linear``'s tensor-parallel arguments (the online mode's given ``weight_scale``, the quantised
modes' given ``row_amax`` and given (mean, rstd)) and ``ln_linear_backward_partial`` with
``quant="bitnet_online"``.

Most tests need no gloo world: the row's features are split into shards in one process, each
shard runs the entry points and the collectives are simulated (the sum of the shards' sums of
squares, the max of their row amax, the sum of their Σ|W| and of their partial outputs and row
sums), so the composition is the unsharded quantised op: its output and, online, every gradient
are held to the unsharded op on the same backend and to the reference. A gloo world of 2 ranks
runs ``row_parallel_norm_linear`` over real collectives against one process.
"""

import itertools
import tempfile

import pytest
import torch
import torch.distributed as dist
from gloo import run_worlds
from harness import assert_close, backend_params, randn, require_backend

import magneto_kernels
from magneto.parallel import functional
from magneto_kernels import quant
from magneto_kernels.codes import QUANT_PACK_UNIT, RTOL

EPS = 1e-6
ROWS, N, SHARDS = 5, 16, 2
K = SHARDS * QUANT_PACK_UNIT  # an offline shard's in_features: a multiple of the packing unit
BACKENDS = [p for p in backend_params() if p.values[0].name in quant.BACKENDS]
ACTS = ["none", "relu2_glu"]


def _inputs(mode, act, seed=0, device="cpu"):
    """x, the norm weight, the weight (the master weight online, else the ternary one) and the
    output gradient, float32, on device."""
    g = torch.Generator().manual_seed(seed)
    x = randn(ROWS, 2 * K if act == "relu2_glu" else K, mean=0.3, std=1.2, generator=g)
    ln_weight = randn(K, mean=1.0, std=0.2, generator=g)
    if mode == "bitnet_online":
        weight = randn(N, K, std=0.05, generator=g)
    else:
        weight = torch.randint(-1, 2, (N, K), generator=g).float()
    dout = randn(ROWS, N, mean=0.2, generator=g)
    return tuple(t.to(device) for t in (x, ln_weight, weight, dout))


def _shard(t, s, gated=False):
    if gated:
        gate, up = t.chunk(2, -1)
        return torch.cat([gate.chunk(SHARDS, -1)[s], up.chunk(SHARDS, -1)[s]], -1)
    return t.chunk(SHARDS, -1)[s].contiguous()


def _sharded(backend, mode, act, x, ln_weight, weight, dout):
    """(out, dx, dln_weight, dweight) of the row-parallel quantised projection, its features in
    SHARDS shards through backend's entry points, every collective simulated; the gradients
    online only (None offline)."""
    norm_stats, ln_linear, backward_partial, norm_backward = functional._entry_points(backend)
    gated = act == "relu2_glu"
    xs = [_shard(x, s, gated) for s in range(SHARDS)]
    lws = [_shard(ln_weight, s) for s in range(SHARDS)]
    ws = [_shard(weight, s) for s in range(SHARDS)]
    stats = [norm_stats(xs[s], "rms", act) for s in range(SHARDS)]
    mean, rstd = stats[0][0], torch.rsqrt(sum(m2 for _, m2 in stats) / K + EPS)
    amaxes = [
        quant.bitnet_norm(quant.relu2_glu(xs[s]) if gated else xs[s], lws[s], EPS, rstd)
        .abs()
        .amax(-1)
        for s in range(SHARDS)
    ]
    row_amax = torch.stack(amaxes).amax(0)
    if mode == "bitnet_online":
        scale = (sum(w.abs().sum() for w in ws) / weight.numel()).reshape(1)
    else:
        scale = torch.tensor([0.43], device=x.device)
        ws = [quant.pack(w) for w in ws]
    args = (None, None, None, EPS, "rms", act, "none", 1.0, 0.0, mode, scale, mean, rstd, row_amax)
    out = sum(ln_linear(xs[s], lws[s], None, ws[s], *args) for s in range(SHARDS))
    if mode != "bitnet_online":
        return out, None, None, None
    halves = [
        backward_partial(
            dout,
            xs[s],
            lws[s],
            None,
            ws[s],
            mean,
            rstd,
            x.new_empty((0,)),
            None,
            "rms",
            act,
            "none",
            0.0,
            [True, True, False],
            mode,
            scale,
            row_amax,
        )  # fmt: skip
        for s in range(SHARDS)
    ]
    row_means = sum(h[1] for h in halves) / K
    grads = [
        norm_backward(
            halves[s][0],
            xs[s],
            lws[s],
            None,
            mean,
            rstd,
            None,
            "rms",
            [True, True, False],
            act,
            row_means,
        )  # fmt: skip
        for s in range(SHARDS)
    ]
    if gated:
        gates, ups = zip(*(g[0].chunk(2, -1) for g in grads))
        dx = torch.cat([*gates, *ups], -1)
    else:
        dx = torch.cat([g[0] for g in grads], -1)
    return out, dx, torch.cat([g[1] for g in grads]), torch.cat([h[2] for h in halves], 1)


def _unsharded(backend, mode, act, x, ln_weight, weight, dout):
    """The same four by the public op on one process, differentiated by autograd (online)."""
    leaves = [t.detach().clone().requires_grad_(mode == "bitnet_online") for t in (x, ln_weight)]
    w = weight.detach().clone().requires_grad_(mode == "bitnet_online")
    scale = None if mode == "bitnet_online" else torch.tensor([0.43], device=x.device)
    out = magneto_kernels.ln_linear(
        leaves[0], leaves[1], None, w if mode == "bitnet_online" else quant.pack(weight),
        eps=EPS, norm="rms", input_activation=act, quant=mode, weight_scale=scale,
        backend=backend,
    )  # fmt: skip
    if mode != "bitnet_online":
        return out, None, None, None
    return (out.detach(), *torch.autograd.grad(out, [*leaves, w], dout))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", quant.QUANT_MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_composed_match_the_unsharded_op(backend, mode, act):
    """Row-parallel: the shards' entry points with the reduced rstd, row amax and (online)
    weight scale given, composed, are the unsharded op on the same backend and the reference:
    output and, online, every gradient."""
    require_backend(backend.name, backend.device)
    inputs = _inputs(mode, act, device=backend.device)
    got = _sharded(backend.name, mode, act, *inputs)
    same = _unsharded(backend.name, mode, act, *inputs)
    ref = _unsharded("reference", mode, act, *inputs)
    for name, g, s, r in zip(("output", "dx", "dln_weight", "dweight"), got, same, ref):
        if g is None:
            continue
        what = f"{backend.name} {mode} {name}"
        assert_close(g, s, RTOL[torch.float32], name=f"{what} vs one process")
        assert_close(g, r, RTOL[torch.float32], name=f"{what} vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_online_weight_scale_given_is_the_weights_own(backend):
    """Column-parallel online: the op given the whole weight's mean|W| computes what it computes
    from the whole weight itself, forward and every gradient; a shard given the whole weight's
    scale is that op's rows."""
    require_backend(backend.name, backend.device)
    x, ln_weight, weight, dout = _inputs("bitnet_online", "none", seed=1, device=backend.device)
    # On a grid of 1/256 (numerators far below 2^10, 4096 of them), Σ|W| is exact in float32 in any
    # order and so is its mean: torch's mean|W| is each family's own, to the bit.
    weight = (weight * 256).round() / 256

    def run(w, scale):
        leaves = [t.detach().clone().requires_grad_() for t in (x, ln_weight, w)]
        out = magneto_kernels.ln_linear(
            leaves[0], leaves[1], None, leaves[2], eps=EPS, norm="rms", quant="bitnet_online",
            weight_scale=scale, backend=backend.name,
        )  # fmt: skip
        return (out, *torch.autograd.grad(out, leaves, dout[:, : w.shape[0]]))

    own = run(weight, None)
    given = run(weight, weight.abs().mean().reshape(1))
    for name, g, o in zip(("output", "dx", "dln_weight", "dweight"), given, own):
        torch.testing.assert_close(g, o, rtol=0, atol=0, msg=f"{backend.name} {name}")
    rows = run(weight[: N // 2], weight.abs().mean().reshape(1))[0]
    # The cpu and Triton kernels sum integer codes (exact in any order); the reference and the
    # cuda backend multiply the fake-quantised float weights in torch's GEMM or cuBLAS, whose
    # summation order may follow the output width (MKL's AVX2 kernels, under the CUDA
    # emulation too): there, equal to fp32 rounding.
    if backend.name in ("reference", "cuda"):
        assert_close(rows, own[0][:, : N // 2], RTOL[torch.float32], name="a shard's rows")
    else:
        torch.testing.assert_close(rows, own[0][:, : N // 2], rtol=0, atol=0)
    # a different scale changes the codes: the argument is read
    other = run(weight, 2.0 * weight.abs().mean().reshape(1))[0]
    assert not torch.equal(other, own[0])


@pytest.mark.parametrize(
    "change, error",
    [
        ({"row_amax": "short"}, r"row_amax must have shape \(5,\), got \(4,\)"),
        ({"row_amax": "float64"}, "row_amax must have dtype torch.float32"),
        ({"quant": "none"}, "row_amax needs quant"),
        ({"weight_scale": "pair"}, r"weight_scale must have shape \(1,\), got \(2,\)"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_errors(backend, change, error):
    """The same error, word for word, on every family (checks.py and csrc/checks.cpp)."""
    require_backend(backend.name, backend.device)
    device = backend.device
    x, ln_weight, weight, _ = _inputs("bitnet_online", "none", device=device)
    row_amax = {
        "short": torch.ones(ROWS - 1, device=device),
        "float64": torch.ones(ROWS, dtype=torch.float64, device=device),
    }
    scale = torch.ones(2, device=device) if change.get("weight_scale") == "pair" else None
    entry = functional._entry_points(backend.name)[1]
    with pytest.raises(ValueError, match=error):
        entry(
            x, ln_weight, None, weight, None, None, None, EPS, "rms", "none", "none", 1.0, 0.0,
            change.get("quant", "bitnet_online"), scale, None, None,
            row_amax.get(change.get("row_amax"), torch.ones(ROWS, device=device)),
        )  # fmt: skip


def _opcheck_cases():
    x, ln_weight, weight, dout = _inputs("bitnet_online", "relu2_glu")
    rstd, row_amax = torch.rand(ROWS) + 0.5, torch.rand(ROWS) + 1.0
    empty, scale = x.new_empty((0,)), weight.abs().mean().reshape(1)
    return {
        "ln_linear": (
            x, ln_weight, None, weight, None, None, None, EPS, "rms", "relu2_glu", "none", 1.0,
            0.0, "bitnet_online", scale, empty, rstd, row_amax,
        ),
        "ln_linear_backward_partial": (
            dout, x, ln_weight, None, weight, empty, rstd, empty, None, "rms", "relu2_glu",
            "none", 0.0, [True, True, False], "bitnet_online", scale, row_amax,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("op", ["ln_linear", "ln_linear_backward_partial"])
def test_opcheck(op):
    """The quantised entry points with the tensor-parallel arguments as registered (schema, fake
    impl, dispatch) on the native family."""
    require_backend("cpu")
    torch.library.opcheck(magneto_kernels.library.get_op(op, "native"), _opcheck_cases()[op])


def test_given_row_amax_has_no_autograd_formula():
    """ln_linear with a given row_amax records no graph: its gradient needs the collectives."""
    require_backend("cpu")
    x, ln_weight, weight, _ = _inputs("bitnet_online", "none")
    with pytest.raises(NotImplementedError, match="row_amax"):
        magneto_kernels.library.get_op("ln_linear", "native")(
            x.requires_grad_(), ln_weight, None, weight, None, None, None, EPS, "rms", "none",
            "none", 1.0, 0.0, "bitnet_online", None, None, None, torch.ones(ROWS),
        )  # fmt: skip


# ------------------------------------------------------------------------------------ gloo


GLOO_BACKENDS = ("cpu", "triton")
"""The families on CPU tensors in a gloo world (the emulated cuda one is selected at import, in
a process of its own: its simulated shards above)."""


def _row_parallel_rank(rank, world, out_dir):
    """This rank's shard of every mode's row-parallel projection through real collectives, per
    family: (output, dx shard, dln_weight shard, dweight shard) per (backend, mode), gradients
    online only."""
    group = dist.group.WORLD
    results = {}
    for backend, mode in itertools.product(GLOO_BACKENDS, quant.QUANT_MODES):
        x, ln_weight, weight, dout = _inputs(mode, "relu2_glu")
        xs = _shard_of(x, rank, world, gated=True).requires_grad_()
        lw = _shard_of(ln_weight, rank, world).requires_grad_()
        w = _shard_of(weight, rank, world)
        scale = None
        if mode == "bitnet_online":
            w.requires_grad_()
        else:
            w, scale = quant.pack(w), torch.tensor([0.43])
        with functional.communication_log() as log:
            partial = functional.row_parallel_norm_linear(
                xs, lw, None, w, EPS, "rms", "relu2_glu", group, backend, quant=mode,
                weight_scale=scale, numel=weight.numel(),
            )  # fmt: skip
            out = functional.reduce_from_parallel(partial, group)
        grads = None
        if mode == "bitnet_online":
            grads = torch.autograd.grad(out, [xs, lw, w], dout)
        results[backend, mode] = (out.detach(), grads, [name for name, _ in log])
    return results


def _shard_of(t, rank, world, gated=False):
    if gated:
        gate, up = t.chunk(2, -1)
        return torch.cat([gate.chunk(world, -1)[rank], up.chunk(world, -1)[rank]], -1)
    return t.chunk(world, -1)[rank].detach().clone().contiguous()


@pytest.mark.parametrize("backend", GLOO_BACKENDS)
def test_row_parallel_over_gloo_is_one_process(_world, backend):
    """2 ranks: every mode's output within 1e-5 of one process on the same family; online
    every gradient too; the collectives counted (the norm's sum of squares, the row amax,
    online the weight scale, the output)."""
    require_backend(backend)
    ranks = [r["row_parallel"] for r in _world]
    for mode in quant.QUANT_MODES:
        inputs = _inputs(mode, "relu2_glu")
        one = _unsharded(backend, mode, "relu2_glu", *inputs)
        for rank, result in enumerate(ranks):
            out, grads, log = result[backend, mode]
            torch.testing.assert_close(out, one[0], rtol=1e-5, atol=1e-5)
            reduces = 4 if mode == "bitnet_online" else 3
            assert log == ["all_reduce"] * reduces, f"{mode}: {log}"
            if grads is None:
                continue
            dx, dlw, dw = grads
            torch.testing.assert_close(dx, _shard_of(one[1], rank, 2, gated=True))
            torch.testing.assert_close(dlw, _shard_of(one[2], rank, 2))
            torch.testing.assert_close(dw, _shard_of(one[3], rank, 2))


# ------------------------------------------------------------------ the Hugging Face plan

HF_MODES = {"online": "bitnet_online", "offline": "bitnet_offline", "bitlinear": "bitlinear"}
HF_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HF_WIDTHS = dict(hidden_size=256, intermediate_size=256)  # a row shard: 128 features at 2 ranks


def _quantised_bitnet(mode):
    """A tiny BitNet whose projections are transformers' class of ``mode`` (random master
    weights online; random ternary weights and per-projection scales offline), and its copy."""
    import copy

    import transformers_models as tm
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights

    torch.manual_seed(0)
    model = tm.bitnet(**HF_WIDTHS)
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name in [n for n in HF_PROJ if hasattr(parent, n)]:
                linear = getattr(parent, name)
                shape = linear.weight.shape
                ternary = torch.randint(-1, 2, shape, generator=gen).float()
                scale = 0.01 + 0.002 * i
                if mode == "bitlinear":
                    q = BitLinear(shape[1], shape[0], bias=False, dtype=torch.float32)
                    q.weight.copy_(pack_weights(ternary.to(torch.int8).clone()))
                    q.weight_scale.fill_(1.0 / scale)
                else:
                    q = AutoBitLinear(shape[1], shape[0], bias=False, online_quant=mode == "online")
                    q.weight.data.copy_(linear.weight if mode == "online" else ternary)
                    if mode != "online":
                        q.weight_scale.fill_(scale)
                        q.requires_grad_(False)
                setattr(parent, name, q)
    return model, copy.deepcopy(model)


def _hf_rank(rank, world):
    """Per mode: this rank's logits, fused-call count and, online, every parameter's gradient
    (with its shard), offline the greedy tokens (KV cache), of the patched and sharded model."""
    import transformers_models as tm

    from magneto.parallel import hf, shard_of, tensor_parallelize_transformers

    results = {}
    for mode in HF_MODES:
        model, _ = _quantised_bitnet(mode)
        tm.mt.apply_magneto(model, backend="cpu")
        tensor_parallelize_transformers(model, dist.group.WORLD)
        with pytest.MonkeyPatch.context() as patch:
            calls = tm.FusedCalls(patch)
            original = hf.row_parallel_norm_linear

            def counting(*args, **kwargs):
                calls.count += 1
                return original(*args, **kwargs)

            patch.setattr(hf, "row_parallel_norm_linear", counting)
            logits = model(tm.ids()).logits
        result = {"logits": logits.detach(), "fused_calls": calls.count}
        if mode == "online":
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
            (logits * weights).sum().backward()
            result["grads"] = {n: p.grad for n, p in model.named_parameters()}
            result["shards"] = {n: shard_of(model, n) for n in result["grads"]}
        else:
            with torch.no_grad():
                result["tokens"] = model.generate(
                    tm.ids(length=5), max_new_tokens=8, do_sample=False, pad_token_id=0
                )
        results[mode] = result
    return results


def _rank(rank, world, out_dir):
    return {"row_parallel": _row_parallel_rank(rank, world, out_dir), "hf": _hf_rank(rank, world)}


@pytest.fixture(scope="module")
def _world():
    """Both gloo tests' results, every rank's, from one world of 2 ranks started once."""
    require_backend("cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        return run_worlds(_rank, [2], out_dir)[2]


@pytest.mark.parametrize("mode", HF_MODES)
def test_hf_plan_matches_one_process(_world, mode):
    """2 ranks, patched and sharded: fp32 logits within 1e-5 of the unpatched one-process
    model, every projection fused (7 calls per layer, as in one process: the quantised q/k/v and
    gate/up run one call per projection; and the head's), online every gradient, offline greedy
    tokens identical."""
    import transformers_models as tm

    _, reference = _quantised_bitnet(mode)
    logits = reference(tm.ids()).logits
    if mode == "online":
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        (logits * weights).sum().backward()
    else:
        with torch.no_grad():
            tokens = reference.generate(
                tm.ids(length=5), max_new_tokens=8, do_sample=False, pad_token_id=0
            )
    for rank, result in enumerate(r["hf"][mode] for r in _world):
        assert result["fused_calls"] == tm.LAYERS * len(HF_PROJ) + tm.HEAD, result["fused_calls"]
        tm.close(result["logits"], logits, what=f"rank {rank} logits")
        if mode != "online":
            assert torch.equal(result["tokens"], tokens)
            continue
        for name, p in reference.named_parameters():
            shard = result["shards"][name]
            want = p.grad if shard is None else p.grad.index_select(*shard)
            tm.close(result["grads"][name], want, what=f"rank {rank} grad of {name}")
