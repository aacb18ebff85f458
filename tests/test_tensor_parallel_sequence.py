"""Sequence parallelism (``tensor_parallelize(..., sequence_parallel=True)``) on gloo, 2
processes, against one process (fp32). The ranks are started once for the module.

- Encoder and Decoder (Sub-LN and Pre-LN, LayerNorm and RMSNorm, vocabulary-parallel or not):
  outputs and every parameter's gradient within RTOL[fp32] = 1e-5 of one process, the layers'
  residual stream really split (a middle layer's output holds length/world rows), and greedy
  decoding with the key/value cache (which runs as plain tensor parallelism) the one-process
  tokens; in training with dropout, the one-process masks;
- the collectives of a layer (``communication_log``): the four all-reduces of tensor
  parallelism replaced by all-gathers and reduce-scatters of the same bytes on the wire;
- the models sequence parallelism refuses, with their ValueError.
"""

import models
import pytest
import torch
import torch.distributed as dist
from gloo import one_process_group, run_worlds
from harness import RTOL, assert_close, require_backend
from test_tensor_parallel import (
    VOCAB,
    D,
    _check_grads,
    _greedy,
    _lm_batch,
    _lm_loss,
    _loss,
    _model,
    _vocab_model,
)

import magneto
from magneto.parallel import communication_log, shard_of, tensor_parallelize

WORLD, LENGTH, BATCH = 2, 8, 2
CASES = [
    ("encoder", "subln", "layer"),
    ("encoder", "pre", "rms"),
    ("decoder", "subln", "layer"),
    ("decoder", "pre", "layer"),
    ("decoder", "subln", "rms"),
]
DROPOUT = 0.1


def _tokens():
    return torch.randint(2, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def _forward(kind, model):
    """(output, the residual stream after the first layer)."""
    if kind == "encoder":
        result = model(_tokens(), return_all_hiddens=True)
        return result["encoder_out"], result["encoder_states"][1]
    out, extra = model(_tokens())
    return out, extra["inner_states"][1]


def _dropout_model():
    return _model("decoder", "subln", "layer", dropout=DROPOUT).train()


def _dropout_step(model):
    torch.manual_seed(5)  # the same generator state on every rank, as in one process
    out, _ = model(_tokens())
    _loss(out).backward()
    return out


# ------------------------------------------------------------------------------------- ranks


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {n: shard_of(model, n) for n in grads}


def _sequence_case(kind, scheme, norm):
    model = _model(kind, scheme, norm).eval()
    tensor_parallelize(model, dist.group.WORLD, sequence_parallel=True)
    with communication_log() as log:
        out, inner = _forward(kind, model)
        _loss(out).backward()
    grads, shards = _grads(model)
    greedy = _greedy(model) if kind == "decoder" else None
    return {
        "out": out.detach(),
        "inner": tuple(inner.shape),
        "grads": grads,
        "shards": shards,
        "greedy": greedy,
        "log": log,
    }


def _vocab_case():
    """Vocabulary-parallel too: the loss from the blocks of the logits."""
    from magneto.parallel import vocab_parallel_cross_entropy

    group = dist.group.WORLD
    model = _vocab_model(tied=True).train()
    tensor_parallelize(model, group, vocab_parallel=True, sequence_parallel=True)
    tokens = _lm_batch()
    loss = vocab_parallel_cross_entropy(model(tokens[:, :-1])[0], tokens[:, 1:], group)
    loss.backward()
    grads, shards = _grads(model)
    return {"loss": loss.detach(), "grads": grads, "shards": shards}


def _tensor_parallel_log():
    model = tensor_parallelize(_model("decoder", "subln", "layer").eval(), dist.group.WORLD)
    with communication_log() as log:
        _loss(_forward("decoder", model)[0]).backward()
    return log


def _dropout_case():
    model = tensor_parallelize(_dropout_model(), dist.group.WORLD, sequence_parallel=True)
    out = _dropout_step(model)
    grads, shards = _grads(model)
    return {"out": out.detach(), "grads": grads, "shards": shards}


def _rank(rank, world, out_dir):
    results = {case: _sequence_case(*case) for case in CASES}
    results["vocab"] = _vocab_case()
    results["tp_log"] = _tensor_parallel_log()
    results["dropout"] = _dropout_case()
    return results


@pytest.fixture(scope="module")
def _runs():
    require_backend("cpu")
    import tempfile

    with tempfile.TemporaryDirectory() as out_dir:
        return run_worlds(_rank, (WORLD,), out_dir)[WORLD]


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind,scheme,norm", CASES)
def test_sequence_parallel_matches_one_process(_runs, kind, scheme, norm):
    per_rank = [r[(kind, scheme, norm)] for r in _runs]
    model = _model(kind, scheme, norm).eval()
    out, _ = _forward(kind, model)
    _loss(out).backward()
    for rank, results in enumerate(per_rank):
        assert results["inner"] == (BATCH, LENGTH // WORLD, D), "the stream is not split"
        assert_close(results["out"], out, RTOL[torch.float32], name=f"rank {rank} output")
    _check_grads(model, per_rank)
    if kind == "decoder":
        want = _greedy(model)
        for results in per_rank:
            assert torch.equal(results["greedy"], want)


def test_sequence_and_vocab_parallel_loss_matches_one_process(_runs):
    per_rank = [r["vocab"] for r in _runs]
    model = _vocab_model(tied=True).train()
    loss = _lm_loss(model, _lm_batch())
    loss.backward()
    for results in per_rank:
        assert_close(results["loss"], loss, RTOL[torch.float32], name="loss")
    _check_grads(model, per_rank)


def test_sequence_parallel_dropout_draws_the_one_process_masks(_runs):
    """In training with dropout after out_proj and fc2, each rank keeps its rows of the mask a
    one-process run draws: outputs and gradients as one process."""
    per_rank = [r["dropout"] for r in _runs]
    model = _dropout_model()
    out = _dropout_step(model)
    for rank, results in enumerate(per_rank):
        assert_close(results["out"], out, RTOL[torch.float32], name=f"rank {rank} output")
    _check_grads(model, per_rank)


def _wire_bytes(log):
    """Bytes each rank sends on a ring: an all-reduce of N bytes 2·(world−1)/world·N, an
    all-gather or reduce-scatter of a part of P bytes (world−1)·P."""
    ring = {"all_reduce": 2 * (WORLD - 1) / WORLD, "all_gather": WORLD - 1}
    ring["reduce_scatter"] = WORLD - 1
    return sum(ring[name] * size for name, size in log)


def test_communication_per_layer(_runs):
    """A Sub-LN decoder's collectives in one training step, against tensor parallelism's: per
    layer the four all-reduces of d floats per row (out_proj's and fc2's outputs forward, the
    input gradients of q/k/v and fc1 backward) become four all-gathers and four
    reduce-scatters of this rank's rows, the same bytes on the wire; the row-parallel biases'
    gradients (d floats each) are all-reduced on top; the model splits its first layer's input
    and gathers its last layer's output (one all-gather of this rank's rows each way)."""
    rows, f32 = BATCH * LENGTH, 4
    whole, part = rows * D * f32, rows // WORLD * D * f32
    replaced = [("all_reduce", whole)] * 4
    replacing = [("all_gather", part)] * 4 + [("reduce_scatter", part)] * 4
    assert _wire_bytes(replaced) == _wire_bytes(replacing)
    for results in _runs:
        tp_log = results["tp_log"]
        sp_log = results[("decoder", "subln", "layer")]["log"]
        kept = list(tp_log)
        for entry in replaced * 2:  # 2 layers
            kept.remove(entry)
        bias_grads = [("all_reduce", D * f32)] * 2 * 2
        boundary = [("all_gather", part)] * 2
        assert sorted(sp_log) == sorted(kept + replacing * 2 + bias_grads + boundary)


def test_sequence_parallel_refuses_what_it_does_not_support():
    torch.manual_seed(0)

    def config(**overrides):
        fixed = dict(backend="cpu", vocab_size=VOCAB, encoder_layers=1, decoder_layers=1)
        return models.config(D, 4, 64, overrides, **fixed)

    cases = [
        (magneto.EncoderDecoder(config()), "cross-attention"),
        (magneto.BEiT3(config(multiway=True), img_size=8, patch_size=4, in_chans=3), "Encoder"),
        (magneto.Encoder(config(multiway=True)), "multiway"),
        (magneto.Decoder(config(norm_scheme="post")), "norm_scheme='post'"),
        (magneto.Decoder(config(norm_scheme="deepnorm")), "norm_scheme='deepnorm'"),
    ]
    with one_process_group():
        for model, message in cases:
            with pytest.raises(ValueError, match=message):
                tensor_parallelize(model, dist.group.WORLD, sequence_parallel=True)
        model = tensor_parallelize(
            magneto.Decoder(config()), dist.group.WORLD, sequence_parallel=True
        )
        model(torch.tensor([[3, 4, 5]]))  # one rank: any length divides
        model.layers[0].self_attn.register_forward_hook(lambda *args: None)
        with pytest.raises(ValueError, match="hooks"):
            model(torch.tensor([[3, 4, 5]]))
