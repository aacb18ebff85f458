"""Sequence parallelism (``tensor_parallelize(..., sequence_parallel=True)``) on gloo, 2
processes, against one process (fp32). The ranks are started once for the module.

- Encoder, Decoder and EncoderDecoder (every norm scheme: Sub-LN, Pre-LN, Post-LN with
  ``layernorm_embedding``, DeepNorm; LayerNorm and RMSNorm; vocabulary-parallel or not):
  outputs and every parameter's gradient within RTOL[fp32] = 1e-5 of one process, the layers'
  residual stream really split (a middle layer's output holds length/world rows), and greedy
  decoding with the key/value cache (which runs as plain tensor parallelism) the one-process
  tokens; in training with dropout, the one-process masks;
- the collectives of a training step (``communication_log``) against tensor parallelism's: the
  activation all-reduces replaced by all-gathers and reduce-scatters of the same bytes on the
  wire, plus the all-reduces of the parameters used on a rank's rows (Sub-LN and Post-LN
  decoders, an encoder-decoder's cross-attention);
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

WORLD, LENGTH, TARGET, BATCH = 2, 8, 6, 2
CASES = [
    ("encoder", "subln", "layer"),
    ("encoder", "pre", "rms"),
    ("encoder", "post", "rms"),
    ("encoder", "deepnorm", "layer"),
    ("decoder", "subln", "layer"),
    ("decoder", "pre", "layer"),
    ("decoder", "subln", "rms"),
    ("decoder", "post", "layer"),
    ("decoder", "deepnorm", "rms"),
    ("encoder_decoder", "subln", "layer"),
    ("encoder_decoder", "post", "layer"),
    ("encoder_decoder", "deepnorm", "rms"),
    ("beit3", "subln", "layer"),
    ("beit3", "post", "rms"),
    ("beit3_text", "subln", "layer"),
]
LOG_CASES = [
    ("decoder", "subln", "layer"),
    ("decoder", "post", "layer"),
    ("encoder_decoder", "subln", "layer"),
]
DROPOUT = 0.1
DROPOUT_KINDS = ["decoder", "beit3"]


def _tokens(length=LENGTH):
    return torch.randint(2, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(1))


def _sequence_model(kind, scheme, norm, **overrides):
    """The case's model; the Post-LN ones with ``layernorm_embedding`` (torchscale's BERT-style
    post-norm stacks), whose norm runs before the split."""
    overrides.setdefault("layernorm_embedding", scheme == "post")
    return _model(kind.removesuffix("_text"), scheme, norm, **overrides).eval()


def _images():
    """BEiT3's: 8x8 images in 4x4 patches, 5 tokens (the class token's too), ahead of the
    text's LENGTH − 1: the split falls inside rank 0's rows, rank 1 holds text alone."""
    return torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(4))


def _forward(kind, model):
    """(output, the residual stream after the first layer of the last stack; None for BEiT3,
    whose model does not return it: its split is checked on the collectives)."""
    if kind == "beit3":
        return model(textual_tokens=_tokens(LENGTH - 1), visual_tokens=_images())[
            "encoder_out"
        ], None
    if kind == "beit3_text":
        return model(textual_tokens=_tokens())["encoder_out"], None
    if kind == "encoder":
        result = model(_tokens(), return_all_hiddens=True)
        return result["encoder_out"], result["encoder_states"][1]
    if kind == "decoder":
        out, extra = model(_tokens())
    else:
        out, extra = model(_tokens(), _tokens(TARGET), return_all_hiddens=True)
    return out, extra["inner_states"][1]


def _stream_length(kind):
    return {"encoder_decoder": TARGET, "beit3": 4 + LENGTH}.get(kind, LENGTH)


def _dropout_model(kind):
    return _sequence_model(kind, "subln", "layer", dropout=DROPOUT, drop_path=DROPOUT).train()


def _dropout_step(kind, model):
    torch.manual_seed(5)  # the same generator state on every rank, as in one process
    out, _ = _forward(kind, model)
    _loss(out).backward()
    return out


# ------------------------------------------------------------------------------------- ranks


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {n: shard_of(model, n) for n in grads}


def _sequence_case(kind, scheme, norm):
    model = _sequence_model(kind, scheme, norm)
    tensor_parallelize(model, dist.group.WORLD, sequence_parallel=True)
    with communication_log() as log:
        out, inner = _forward(kind, model)
        _loss(out).backward()
    grads, shards = _grads(model)
    greedy = _greedy(model) if kind == "decoder" else None
    return {
        "out": out.detach(),
        "inner": None if inner is None else tuple(inner.shape),
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


def _tensor_parallel_log(kind, scheme, norm):
    model = tensor_parallelize(_sequence_model(kind, scheme, norm), dist.group.WORLD)
    with communication_log() as log:
        _loss(_forward(kind, model)[0]).backward()
    return log


def _dropout_case(kind):
    model = tensor_parallelize(_dropout_model(kind), dist.group.WORLD, sequence_parallel=True)
    out = _dropout_step(kind, model)
    grads, shards = _grads(model)
    return {"out": out.detach(), "grads": grads, "shards": shards}


def _rank(rank, world, out_dir):
    results = {case: _sequence_case(*case) for case in CASES}
    results["vocab"] = _vocab_case()
    results["tp_log"] = {case: _tensor_parallel_log(*case) for case in LOG_CASES}
    results["dropout"] = {kind: _dropout_case(kind) for kind in DROPOUT_KINDS}
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
    model = _sequence_model(kind, scheme, norm)
    out, _ = _forward(kind, model)
    _loss(out).backward()
    rows = BATCH * _stream_length(kind) // WORLD
    for rank, results in enumerate(per_rank):
        if results["inner"] is not None:
            assert results["inner"][1] * BATCH == rows, "the stream is not split"
        assert ("reduce_scatter", rows * D * 4) in results["log"], "the stream is not split"
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


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_sequence_parallel_dropout_draws_the_one_process_masks(_runs, kind):
    """In training with dropout after out_proj and fc2 and drop path, each rank keeps its rows
    of the mask a one-process run draws (BEiT3: of each part's mask, A's drawn before B's),
    and the same per-sample drop path: outputs and gradients as one process."""
    per_rank = [r["dropout"][kind] for r in _runs]
    model = _dropout_model(kind)
    out = _dropout_step(kind, model)
    for rank, results in enumerate(per_rank):
        assert_close(results["out"], out, RTOL[torch.float32], name=f"rank {rank} output")
    _check_grads(model, per_rank)


def _wire_bytes(log):
    """Bytes each rank sends on a ring: an all-reduce of N bytes 2·(world−1)/world·N, an
    all-gather or reduce-scatter of a part of P bytes (world−1)·P."""
    ring = {"all_reduce": 2 * (WORLD - 1) / WORLD, "all_gather": WORLD - 1}
    ring["reduce_scatter"] = WORLD - 1
    return sum(ring[name] * size for name, size in log)


def _stack_collectives(rows, sublayers, norm_params, layers=2):
    """(replaced, replacing): a stack's tensor-parallel all-reduces that sequence parallelism
    replaces, and what it runs instead, for ``layers`` layers of ``sublayers`` blocks on
    ``rows`` rows (``norm_params``: the weight and bias of a norm after the residual add, 0
    when the norms come before). Per block the all-reduce of the row-parallel output (forward)
    and of the column-parallel input's gradient (backward), d floats per row each, become an
    all-gather and a reduce-scatter of this rank's rows each way; the row-parallel bias and a
    post-add norm's parameters, used on this rank's rows only, get their gradients
    all-reduced (d floats each); the stack splits its first layer's input and gathers its last
    layer's output (an all-gather of this rank's rows each way)."""
    f32 = 4
    whole, part, vector = rows * D * f32, rows // WORLD * D * f32, D * f32
    blocks = sublayers * layers
    replaced = [("all_reduce", whole)] * 2 * blocks
    replacing = [("all_gather", part), ("reduce_scatter", part)] * 2 * blocks
    assert _wire_bytes(replaced) == _wire_bytes(replacing)
    vectors = [("all_reduce", vector)] * (1 + norm_params) * blocks
    return replaced, replacing + vectors + [("all_gather", part)] * 2


@pytest.mark.parametrize("kind,scheme,norm", LOG_CASES)
def test_communication_per_layer(_runs, kind, scheme, norm):
    """One training step's collectives against tensor parallelism's (``_stack_collectives``).
    In an encoder-decoder the decoder's cross-attention adds a block whose query is gathered;
    its keys and values come from the whole encoder output, their input gradient all-reduced
    as under tensor parallelism (kept)."""
    norm_params = 0 if scheme in ("subln", "pre") else {"layer": 2, "rms": 1}[norm]
    stacks = {
        "decoder": [(BATCH * LENGTH, 2)],
        "encoder_decoder": [(BATCH * LENGTH, 2), (BATCH * TARGET, 3)],
    }[kind]
    for results in _runs:
        kept, want = list(results["tp_log"][(kind, scheme, norm)]), []
        for rows, sublayers in stacks:
            replaced, replacing = _stack_collectives(rows, sublayers, norm_params)
            for entry in replaced:
                kept.remove(entry)
            want += replacing
        assert sorted(results[(kind, scheme, norm)]["log"]) == sorted(kept + want)


def test_sequence_parallel_refuses_what_it_does_not_support():
    torch.manual_seed(0)

    def config(**overrides):
        fixed = dict(backend="cpu", vocab_size=VOCAB, encoder_layers=1, decoder_layers=1)
        return models.config(D, 4, 64, overrides, **fixed)

    cases = [
        (torch.nn.Sequential(magneto.Encoder(config())), "an Encoder, a Decoder"),
        (magneto.Encoder(config(moe_freq=1, moe_expert_count=2)), "MoE"),
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
        post = magneto.Decoder(config(norm_scheme="post"))
        tensor_parallelize(post, dist.group.WORLD, sequence_parallel=True)
        post(torch.tensor([[3, 4, 5]]))
        post.layers[0].final_layer_norm.register_forward_hook(lambda *args: None)
        with pytest.raises(ValueError, match="hooks"):  # add_layer_norm's collective skipped
            post(torch.tensor([[3, 4, 5]]))
