"""Tensor parallelism on gloo (CPU), 2 and 4 processes, against one process (fp32).

The ranks are started once per world size for the whole module (``_runs``): each rank runs
every case, saves what it computed (its shard of outputs and gradients) and exits; the tests
compare that with the same model run here in one process.

- the sharded norm (``sharded_norm``): outputs and gradients of rows split over the ranks,
  LayerNorm and RMSNorm, at |mean|/std up to 1e4, against float64 (the sharper check: within
  twice PyTorch's own fp32 error); the sum / sum-of-squares combine it replaces, shown wrong;
- ``tensor_parallelize``: Encoder, Decoder, EncoderDecoder (every norm scheme, LayerNorm and
  RMSNorm) and BEiT3, outputs and every parameter's gradient; greedy decoding with the KV cache
  gives the one-process tokens; the collectives of a layer (``communication_log``) are the ones
  docs/design.md counts, and a sharded fc2 keeps only its input and the row statistics and
  runs each of the op family's sharded-norm entry points once (the norm fused with it);
- vocabulary-parallel embedding, output projection (tied or not), loss and greedy argmax;
- a 2-D mesh (FSDP2 over 2 data-parallel ranks × 2 tensor-parallel ranks, with sequence
  parallelism too on a DeepNorm decoder): one training step's gradients and updated parameters;
- a distributed checkpoint saved by 2 tensor-parallel ranks, loaded by 4; one saved by an
  FSDP2 × TP model (2-D mesh), loaded at another tensor-parallel degree with and without FSDP2.
"""

import os
import tempfile

import models
import pytest
import torch
import torch.distributed as dist
from gloo import run_worlds
from harness import RTOL, assert_close, assert_close_to_reference, require_backend

import magneto
from magneto.parallel import chan_combine, shard_of, tensor_parallelize

D, HEADS, FFN, VOCAB = 32, 4, 64, 29
ROWS, FEATURES = 6, 48
NORM_CASES = [(norm, mean) for norm in ("layer", "rms") for mean in (0.0, 3.0, 1e3, 1e4)]
MODEL_CASES = (
    [("encoder", s, "layer") for s in ("subln", "pre", "post", "deepnorm")]
    + [("decoder", s, "layer") for s in ("subln", "pre", "post", "deepnorm")]
    + [("encoder_decoder", s, "layer") for s in ("subln", "deepnorm")]
    + [("decoder", "subln", "rms"), ("encoder", "pre", "rms"), ("beit3", "subln", "layer")]
)
WORLDS = (2, 4)


# ------------------------------------------------------------------------ shared by both sides


def _norm_inputs(norm, mean):
    g = torch.Generator().manual_seed(int(mean) + len(norm))
    x = torch.randn(ROWS, FEATURES, generator=g, dtype=torch.float64) + mean
    weight = 1 + 0.1 * torch.randn(FEATURES, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(FEATURES, generator=g, dtype=torch.float64)
    dy = torch.randn(ROWS, FEATURES, generator=g, dtype=torch.float64)
    return x.float(), weight.float(), bias.float() if norm == "layer" else None, dy.float()


def _model(kind, scheme, norm, **overrides):
    torch.manual_seed(0)
    fixed = dict(
        norm_scheme=scheme,
        norm=norm,
        backend="cpu",
        vocab_size=overrides.pop("vocab_size", VOCAB),
        max_positions=32,
        encoder_layers=2,
        decoder_layers=2,
    )
    if kind == "beit3":
        config = models.config(D, HEADS, FFN, dict(multiway=True, **overrides), **fixed)
        return models.perturb(magneto.BEiT3(config, img_size=8, patch_size=4, in_chans=3))
    config = models.config(D, HEADS, FFN, overrides, **fixed)
    build = {
        "encoder": magneto.Encoder,
        "decoder": magneto.Decoder,
        "encoder_decoder": magneto.EncoderDecoder,
    }[kind]
    return models.perturb(build(config))


def _output(kind, model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, VOCAB, (2, 7), generator=g)
    if kind == "beit3":
        images = torch.randn(2, 3, 8, 8, generator=g)
        return model(textual_tokens=tokens, visual_tokens=images)["encoder_out"]
    if kind == "encoder":
        return model(tokens)["encoder_out"]
    if kind == "decoder":
        return model(tokens)[0]
    return model(tokens, torch.randint(2, VOCAB, (2, 5), generator=g))[0]


def _loss(out):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return (out * weights).sum()


def _greedy(model, steps=6, argmax=lambda logits: logits.argmax(-1)):
    tokens, state = torch.tensor([[3], [5]]), {}
    with torch.no_grad():
        for _ in range(steps):
            logits = model(tokens, incremental_state=state)[0]
            tokens = torch.cat([tokens, argmax(logits[:, -1]).unsqueeze(-1)], dim=1)
    return tokens


def _lm_loss(model, tokens):
    logits = model(tokens[:, :-1])[0]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _lm_batch():
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------- ranks


def _norm_case(norm, mean, rank, world):
    from magneto.parallel import sharded_norm

    x, weight, bias, dy = _norm_inputs(norm, mean)
    cols = slice(rank * FEATURES // world, (rank + 1) * FEATURES // world)
    leaves = [t[..., cols].clone().requires_grad_() for t in (x, weight)]
    b = None if bias is None else bias[cols].clone().requires_grad_()
    y = sharded_norm(leaves[0], leaves[1], b, 1e-5, norm, dist.group.WORLD)
    y.backward(dy[..., cols])
    dbias = None if b is None else b.grad
    return {"y": y.detach(), "dx": leaves[0].grad, "dweight": leaves[1].grad, "dbias": dbias}


def _model_case(kind, scheme, norm):
    from magneto.parallel import communication_log

    model = tensor_parallelize(_model(kind, scheme, norm).eval(), dist.group.WORLD)
    with communication_log() as log:
        out = _output(kind, model)
        _loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    shards = {n: shard_of(model, n) for n in grads}
    greedy = _greedy(model) if kind == "decoder" else None
    return {"out": out.detach(), "grads": grads, "shards": shards, "greedy": greedy, "log": log}


def _saved_by_fc2():
    """Shapes of what a sharded fc2 (gelu on its input, ffn_layernorm, residual add) keeps for
    backward, parameters aside."""
    ffn = tensor_parallelize(_model("decoder", "subln", "layer"), dist.group.WORLD).layers[0].ffn
    params = {p.data_ptr() for p in ffn.parameters()}
    preact = torch.randn(2, 7, ffn.fc2.in_features, requires_grad=True)
    residual = torch.randn(2, 7, D, requires_grad=True)
    saved = []

    def keep(t):
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        magneto.fusion.project(
            "fc2", preact, ffn.fc2, ffn.ffn_layernorm, input_activation="gelu", residual=residual
        )
    return sorted(saved)


def _vocab_model(tied):
    return _model("decoder", "subln", "layer", vocab_size=32, share_input_output_embed=tied)


def _vocab_parallel(tied):
    from magneto.parallel import vocab_parallel_argmax, vocab_parallel_cross_entropy

    model = tensor_parallelize(_vocab_model(tied).train(), dist.group.WORLD, vocab_parallel=True)
    greedy = _greedy(model.eval(), argmax=lambda t: vocab_parallel_argmax(t, dist.group.WORLD))
    model.train()
    tokens = _lm_batch()
    logits = model(tokens[:, :-1])[0]
    loss = vocab_parallel_cross_entropy(logits, tokens[:, 1:], dist.group.WORLD)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    shards = {n: shard_of(model, n) for n in grads}
    return {"loss": loss.detach(), "grads": grads, "shards": shards, "greedy": greedy}


def _two_d_step(scheme="subln", sequence_parallel=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model("decoder", scheme, "layer").train()
    tensor_parallelize(model, mesh, "tp", sequence_parallel=sequence_parallel)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _lm_loss(model, _lm_batch().chunk(2)[mesh["dp"].get_local_rank()]).backward()
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    optimizer.step()
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    shards = {n: shard_of(model, n) for n in grads}
    return {"grads": grads, "params": params, "shards": shards}


def _checkpoint(world, directory):
    """2 ranks save a model; 4 ranks load it into a model of other parameters and run it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from magneto.parallel import load_sharded_state_dict, sharded_state_dict

    mesh = init_device_mesh("cpu", (world,))
    model = _model("decoder", "subln", "layer").eval()
    if world == 4:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
    tensor_parallelize(model, mesh)
    state = sharded_state_dict(model, mesh)
    if world == 2:
        dcp.save(state, checkpoint_id=directory)
        return None
    dcp.load(state, checkpoint_id=directory)
    load_sharded_state_dict(model, state)
    with torch.no_grad():
        return _output("decoder", model)


def _fsdp_checkpoint(directory):
    """4 ranks: an FSDP2 (2) × TP (2) model saves; a TP-4 model and an FSDP2 (4) × TP (1) one,
    both of other parameters, load it and run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from magneto.parallel import load_sharded_state_dict, sharded_state_dict

    def build(shape, scale):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        model = _model("decoder", "subln", "layer").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        tensor_parallelize(model, mesh, "tp")
        if shape[0] > 1:
            for layer in model.layers:
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        return model, mesh["tp"]

    model, tp = build((2, 2), 1.0)
    dcp.save(sharded_state_dict(model, tp), checkpoint_id=directory)
    outputs = []
    for shape in ((1, 4), (4, 1)):
        model, tp = build(shape, 0.5)
        state = sharded_state_dict(model, tp)
        dcp.load(state, checkpoint_id=directory)
        load_sharded_state_dict(model, state)
        with torch.no_grad():
            outputs.append(_output("decoder", model))
    return outputs


_SHARDED_NORM_OPS = ("norm_stats", "ln_linear", "ln_linear_backward_partial", "layer_norm_backward")


def _fused_calls_of_fc2():
    """How many times a sharded fc2's forward and backward ran each of the op family's
    sharded-norm entry points (torch.profiler's op events)."""
    ffn = tensor_parallelize(_model("decoder", "subln", "layer"), dist.group.WORLD).layers[0].ffn
    preact = torch.randn(2, 7, ffn.fc2.in_features, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = magneto.fusion.project(
            "fc2", preact, ffn.fc2, ffn.ffn_layernorm, input_activation="gelu"
        )
        out.sum().backward()
    names = [event.name for event in prof.events()]
    return {op: names.count(f"magneto::{op}_native") for op in _SHARDED_NORM_OPS}


def _rank(rank, world, out_dir):
    results = {("norm", *case): _norm_case(*case, rank, world) for case in NORM_CASES}
    for case in MODEL_CASES:
        results[("model", *case)] = _model_case(*case)
    results["saved_by_fc2"] = _saved_by_fc2()
    for tied in (False, True):
        results[("vocab", tied)] = _vocab_parallel(tied)
    if world == 4:
        results["two_d"] = _two_d_step()
        results["two_d_sequence"] = _two_d_step("deepnorm", sequence_parallel=True)
        results["fsdp_checkpoint"] = _fsdp_checkpoint(os.path.join(out_dir, "fsdp_checkpoint"))
    results["checkpoint"] = _checkpoint(world, os.path.join(out_dir, "checkpoint"))
    results["fused_calls_of_fc2"] = _fused_calls_of_fc2()
    return results


@pytest.fixture(scope="module")
def _runs():
    """{world: [rank 0's results, rank 1's, ...]}, the ranks started once per world size (2
    first: it writes the checkpoint 4 reads)."""
    require_backend("cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        return run_worlds(_rank, WORLDS, out_dir)


# ------------------------------------------------------------------------------------- tests


def _assemble(per_rank, name):
    """The whole tensor from the ranks' consecutive feature shards."""
    return torch.cat([r[name] for r in per_rank], dim=-1)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("norm,mean", NORM_CASES)
def test_sharded_norm_matches_one_process(_runs, world, norm, mean):
    per_rank = [r[("norm", norm, mean)] for r in _runs[world]]
    x, weight, bias, dy = _norm_inputs(norm, mean)
    leaves = {"x": x, "weight": weight, "bias": bias}

    def forward_backward(dtype):
        ts = {k: None if v is None else v.to(dtype).requires_grad_() for k, v in leaves.items()}
        if norm == "layer":
            y = torch.nn.functional.layer_norm(ts["x"], (FEATURES,), ts["weight"], ts["bias"])
        else:
            y = torch.nn.functional.rms_norm(ts["x"], (FEATURES,), ts["weight"], 1e-5)
        y.backward(dy.to(dtype))
        grads = {f"d{k}": v.grad for k, v in ts.items() if v is not None}
        return {"y": y.detach(), **grads}

    ref64, torch32 = forward_backward(torch.float64), forward_backward(torch.float32)
    for name, want in ref64.items():
        if name in ("dweight", "dbias"):
            got = torch.cat([r[name] for r in per_rank])
        else:
            got = _assemble(per_rank, name)
        assert_close_to_reference(got, want, torch32[name], f"{norm} mean={mean} {name}")


def test_sum_of_squares_combine_loses_the_variance_at_large_mean():
    """What the sharded norm does not do: combining per-shard sums and sums of squares in fp32
    (E[x²] − E[x]²) loses the variance at |mean|/std = 1e3, where Chan's combine of per-shard
    (mean, M2) keeps it."""
    x = _norm_inputs("layer", 1e3)[0]
    shards = x.chunk(4, dim=-1)
    var64 = x.double().var(-1, unbiased=False)
    sums = sum(s.sum(-1) for s in shards) / FEATURES
    squares = sum(s.square().sum(-1) for s in shards) / FEATURES
    naive = squares - sums.square()
    means = torch.stack([s.mean(-1) for s in shards])
    m2s = torch.stack([(s - s.mean(-1, keepdim=True)).square().sum(-1) for s in shards])
    chan = chan_combine(means, m2s, FEATURES // 4)[1] / FEATURES
    assert ((naive.double() - var64).abs() / var64).max() > 1e-2
    assert_close(chan, var64, RTOL[torch.float32] * 10)


def _one_process(kind, scheme, norm):
    model = _model(kind, scheme, norm).eval()
    out = _output(kind, model)
    _loss(out).backward()
    return model, out


def _check_grads(model, per_rank, key="grads", values=None):
    values = values or {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(set(results[key]) == set(values) for results in per_rank)
    for name, want in values.items():
        for rank, results in enumerate(per_rank):
            shard = results["shards"][name]
            if shard is not None:
                want_r = want.index_select(shard[0], shard[1])
            else:
                want_r = want
            got = results[key][name]
            assert_close(got, want_r, RTOL[torch.float32], name=f"rank {rank} {key} {name}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind,scheme,norm", MODEL_CASES)
def test_model_matches_one_process(_runs, world, kind, scheme, norm):
    per_rank = [r[("model", kind, scheme, norm)] for r in _runs[world]]
    model, out = _one_process(kind, scheme, norm)
    for rank, results in enumerate(per_rank):
        assert_close(results["out"], out, RTOL[torch.float32], name=f"rank {rank} output")
    _check_grads(model, per_rank)
    if kind == "decoder":
        want = _greedy(model)
        for results in per_rank:
            assert torch.equal(results["greedy"], want)


@pytest.mark.parametrize("world", WORLDS)
def test_communication_per_layer(_runs, world):
    """A Sub-LN decoder layer's collectives in one training step (forward and backward), as
    docs/design.md counts them: per row, out_proj's and fc2's outputs (d floats each) all-reduced
    forward, the input gradients of q/k/v and fc1 (d each) backward; per inner norm 2 floats
    all-gathered forward and 2 all-reduced backward; the fused input norms' weight and bias
    gradients (d floats each, per projection site) all-reduced."""
    rows, f32 = 2 * 7, 4
    per_layer = (
        [("all_reduce", rows * D * f32)] * 4
        + [("all_gather", 2 * rows * f32)] * 2
        + [("all_reduce", 2 * rows * f32)] * 2
        + [("all_reduce", D * f32)] * 4
    )
    for results in _runs[world]:
        log = results[("model", "decoder", "subln", "layer")]["log"]
        assert sorted(log) == sorted(per_layer * 2)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vocab_parallel_loss_matches_one_process(_runs, world, tied):
    """Token embedding and output projection split by vocabulary blocks (tied: one parameter),
    the loss from the blocks of the logits: the one-process cross entropy and gradients."""
    per_rank = [r[("vocab", tied)] for r in _runs[world]]
    model = _vocab_model(tied).train()
    loss = _lm_loss(model, _lm_batch())
    loss.backward()
    for results in per_rank:
        assert_close(results["loss"], loss, RTOL[torch.float32], name="loss")
        sharded = [n for n, shard in results["shards"].items() if shard is not None]
        assert {"embed_tokens.weight"} <= set(sharded)
    _check_grads(model, per_rank)


@pytest.mark.parametrize("world", WORLDS)
def test_row_parallel_projection_keeps_what_the_fused_op_keeps(_runs, world):
    """A sharded fc2 keeps its input (fc1's pre-activation, this rank's columns) and the row
    statistics (per row, as the ops take them), as the fused op does: the activation and the
    normalised rows are recomputed."""
    for results in _runs[world]:
        assert results["saved_by_fc2"] == sorted([(2, 7, FFN // world), (2 * 7,), (2 * 7,)])


@pytest.mark.parametrize("world", WORLDS)
def test_row_parallel_projection_runs_the_fused_entry_points(_runs, world):
    """A sharded fc2 (forward and backward) is one call of each sharded-norm entry point: the
    norm stays fused with the projection (an unfused fallback would call none of the others)."""
    for results in _runs[world]:
        assert results["fused_calls_of_fc2"] == dict.fromkeys(_SHARDED_NORM_OPS, 1)


@pytest.mark.parametrize(
    "key,scheme", [("two_d", "subln"), ("two_d_sequence", "deepnorm")], ids=["tp", "tp_sp"]
)
def test_fsdp2_times_tensor_parallel_step_matches_one_process(_runs, key, scheme):
    """FSDP2 over the data-parallel ranks × tensor parallelism (and sequence parallelism, on a
    DeepNorm decoder whose norms after the add run on a rank's rows): one SGD step."""
    per_rank = [r[key] for r in _runs[4]]
    model = _model("decoder", scheme, "layer").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _lm_loss(model, _lm_batch()).backward()
    _check_grads(model, per_rank)
    optimizer.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    _check_grads(model, per_rank, "params", params)


def test_checkpoint_saved_by_2_ranks_loads_on_4(_runs):
    with torch.no_grad():
        want = _output("decoder", _model("decoder", "subln", "layer").eval())
    for rank, results in enumerate(_runs[4]):
        assert_close(results["checkpoint"], want, RTOL[torch.float32], name=f"rank {rank}")


def test_fsdp2_checkpoint_loads_at_another_tensor_parallel_degree(_runs):
    """Saved by an FSDP2 (2) × TP (2) model, loaded by a TP-4 one and by an FSDP2 (4) × TP (1)
    one (their parameters other before): the saved model's outputs."""
    with torch.no_grad():
        want = _output("decoder", _model("decoder", "subln", "layer").eval())
    for rank, results in enumerate(_runs[4]):
        for shape, out in zip(("TP 4", "FSDP2 4 x TP 1"), results["fsdp_checkpoint"]):
            assert_close(out, want, RTOL[torch.float32], name=f"rank {rank} {shape}")
