"""magneto.relative_position against torchscale 0.3.0's RelativePositionBias, side by side: the
buckets, the (batch·heads, tgt, src) bias and its gradient with parameters loaded both ways, the
tables inside torchscale's encoder and decoder (their state-dict names), the bias added to
attention scores as torchscale's attention adds it, and the decoding row torchscale means."""

import pytest
import torch
import torch.nn.functional as F
from harness import assert_close, randn
from torchscale.architecture.config import EncoderDecoderConfig
from torchscale.architecture.encoder_decoder import EncoderDecoder as TSEncoderDecoder
from torchscale.component.multihead_attention import MultiheadAttention as TSAttention
from torchscale.component.relative_position_bias import RelativePositionBias as TSBias

from magneto.relative_position import RelativePositionBias, relative_position_bucket

TABLES = [  # (num_buckets, max_distance, bidirectional)
    (32, 128, True),
    (32, 256, True),  # torchscale's tests: rel_pos_buckets=32, max_rel_pos=256
    (8, 16, True),
    (16, 20, False),
    (4, 5, True),
]


def _ids(table):
    return "b{}-max{}-{}".format(table[0], table[1], "bi" if table[2] else "causal")


@pytest.mark.parametrize("table", TABLES, ids=_ids)
def test_buckets_are_torchscales(table):
    num_buckets, max_distance, bidirectional = table
    relative = torch.arange(-600, 601)[None, :] + torch.arange(0, 3)[:, None]
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = TSBias._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert int(ours.min()) == 0 and int(ours.max()) == num_buckets - 1


def _pair(table, heads=3, seed=0):
    num_buckets, max_distance, bidirectional = table
    torch.manual_seed(seed)
    theirs = TSBias(bidirectional, num_buckets, max_distance, heads)
    ours = RelativePositionBias(num_buckets, max_distance, heads, bidirectional)
    return ours, theirs


@pytest.mark.parametrize("table", TABLES, ids=_ids)
@pytest.mark.parametrize(
    "shape", [(2, 7, 7, None), (3, 5, 9, None), (2, 4, 12, 8), (1, 1, 300, 299)]
)
@pytest.mark.parametrize("direction", ["theirs_into_ours", "ours_into_theirs"])
def test_bias_and_gradient_are_torchscales(table, shape, direction):
    batch, qlen, klen, step = shape
    ours, theirs = _pair(table)
    source, target = (theirs, ours) if direction == "theirs_into_ours" else (ours, theirs)
    with torch.no_grad():
        source.relative_attention_bias.weight.normal_()
    target.load_state_dict(source.state_dict(), strict=True)
    out, ref = ours(batch, qlen, klen, step), theirs(batch, qlen, klen, step)
    assert out.shape == ref.shape == (batch * 3, qlen, klen)
    assert torch.equal(out, ref)
    dy = randn(*out.shape)
    out.backward(dy)
    ref.backward(dy)
    grads = ours.relative_attention_bias.weight.grad, theirs.relative_attention_bias.weight.grad
    assert_close(*grads, rtol=1e-6, name="d relative_attention_bias")


def test_decoding_step_row_is_the_last_row_of_the_full_bias():
    """torchscale's decoder slices ``bias[-1:]`` (the last batch·head) where the last query row
    is meant; ``bias(1, klen, step=klen − 1)`` is that row."""
    ours, theirs = _pair((32, 128, True), heads=2)
    ours.load_state_dict(theirs.state_dict())
    full = theirs(3, 10, 10).view(3, 2, 10, 10)
    step = ours.bias(1, 10, step=9)
    assert step.shape == (1, 2, 1, 10)
    assert torch.equal(step.expand(3, -1, -1, -1), full[:, :, -1:])
    cross = theirs(3, 10, 6).view(3, 2, 10, 6)  # cross-attention: decoder row 9 vs 6 keys
    assert torch.equal(ours.bias(1, 6, step=9).expand(3, -1, -1, -1), cross[:, :, -1:])


def _args(**extra):
    dims = dict(embed_dim=16, attention_heads=2, ffn_embed_dim=32, layers=2)
    sides = {f"{s}_{k}": v for s in ("encoder", "decoder") for k, v in dims.items()}
    return EncoderDecoderConfig(**sides, vocab_size=20, rel_pos_buckets=8, max_rel_pos=24, **extra)


def test_tables_inside_torchscales_models_load_by_name():
    """Encoder ``relative_position``, decoder ``self_attn_relative_position`` and
    ``cross_attn_relative_position``: each loads into ours by its state-dict prefix and gives
    the bias torchscale computes for that attention (all three bidirectional)."""
    torch.manual_seed(0)
    model = TSEncoderDecoder(_args())
    state = model.state_dict()
    tables = {
        "encoder.relative_position": (5, 7, 7),
        "decoder.self_attn_relative_position": (5, 4, 4),
        "decoder.cross_attn_relative_position": (5, 4, 7),
    }
    for prefix, (batch, qlen, klen) in tables.items():
        theirs = model.get_submodule(prefix)
        assert theirs.bidirectional
        ours = RelativePositionBias(theirs.num_buckets, theirs.max_distance, theirs.n_heads)
        ours.load_state_dict(
            {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")},
            strict=True,
        )
        assert torch.equal(ours(batch, qlen, klen), theirs(batch, qlen, klen)), prefix


@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_bias_in_sdpa_is_torchscales_rel_pos(self_attention):
    """torchscale's attention adds ``rel_pos`` to the scaled scores after the masks; the
    (1, heads, tgt, src) bias as SDPA's additive mask (with the causal mask folded in) gives the
    same output and gradients, table gradient included."""
    heads, d, batch, tgt, src = 2, 16, 3, 6, 6 if self_attention else 9
    torch.manual_seed(0)
    attention = TSAttention(
        _args(),
        d,
        heads,
        self_attention=self_attention,
        encoder_decoder_attention=not self_attention,
    )
    ours, theirs = _pair((8, 24, True), heads=heads)
    ours.load_state_dict(theirs.state_dict())
    x = randn(batch, tgt, d, mean=0.3).requires_grad_()
    memory = x if self_attention else randn(batch, src, d).requires_grad_()
    causal = torch.full((tgt, src), float("-inf")).triu(1) if self_attention else None
    ref, _ = attention(x, memory, memory, attn_mask=causal, rel_pos=theirs(batch, tgt, src))
    dy = randn(*ref.shape)
    ref.backward(dy)
    ref_grads = [x.grad.clone(), theirs.relative_attention_bias.weight.grad]
    x.grad = None

    def heads_of(t):
        return t.unflatten(-1, (heads, d // heads)).transpose(1, 2)

    q, k, v = (
        heads_of(p(t))
        for p, t in zip((attention.q_proj, attention.k_proj, attention.v_proj), (x, memory, memory))
    )
    mask = ours.bias(tgt, src)
    if causal is not None:
        mask = mask + causal
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attention.out_proj(out.transpose(1, 2).flatten(2))
    assert_close(out, ref, rtol=1e-6)
    out.backward(dy)
    assert_close(x.grad, ref_grads[0], rtol=1e-5, name="dx")
    assert_close(ours.relative_attention_bias.weight.grad, ref_grads[1], rtol=1e-5, name="dtable")


@pytest.mark.parametrize(
    "args,match",
    [
        ((2, 8, 2, True), "no exact bucket"),
        ((1, 8, 2, False), "no exact bucket"),
        ((32, 8, 2, True), "max_distance=8 must exceed"),
    ],
)
def test_bad_tables_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        RelativePositionBias(*args)
