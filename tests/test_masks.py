"""Attention masks read as the entry point's library reads them (magneto/masks.py).

- magneto.nn against torch.nn, side by side: magneto's Pre-LN layers with the weights of
  torch.nn's norm_first layers compute the same function, so every mask torch.nn takes (bool,
  float with finite values, 2-D and per head, key padding masks of both dtypes, mixed, the
  is_causal hints) must give torch.nn's output. Integer masks, which torch.nn refuses, are
  refused with an error naming the argument.
- torchscale's entry points against torchscale 0.3.0: integer and float 0/1 padding masks and an
  encoder's integer attn_mask read as nonzero = masked; a decoder layer's integer
  self_attn_mask too, where torchscale would add it to the scores (the documented rule: the
  result is torchscale's for the same mask as -inf/0 floats).
- MultiheadAttention's own rules: an integer mask masks where a bool one does; a float key
  padding mask is a bias.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from harness import RTOL, assert_close, randn
from models import perturb
from torch import nn

import magneto
from magneto.compat.torchscale import from_torchscale
from magneto.nn import magnetize

D, HEADS, FFN, B, S, T = 16, 4, 24, 3, 5, 4
TOL = dict(rtol=RTOL[torch.float64], atol=1e-12)
TORCHSCALE_TOL = dict(rtol=1e-6, atol=1e-12)  # torchscale's softmax runs in float32


def torch_twins(kind="encoder", activation=F.relu):
    """torch.nn's norm_first layer and magneto.nn's Pre-LN layer with its weights: the same
    function (float64, no dropout, training mode so that torch.nn takes its slow path)."""
    torch.manual_seed(0)
    args = dict(
        dropout=0.0, batch_first=True, norm_first=True, dtype=torch.float64, activation=activation
    )
    if kind == "encoder":
        theirs = perturb(nn.TransformerEncoderLayer(D, HEADS, FFN, **args))
        stack = nn.TransformerEncoder(copy.deepcopy(theirs), 1, enable_nested_tensor=False)
    else:
        theirs = perturb(nn.TransformerDecoderLayer(D, HEADS, FFN, **args))
        stack = nn.TransformerDecoder(copy.deepcopy(theirs), 1)
    ours = magnetize(stack, copy_weights=True, norm_scheme="pre").layers[0]
    return theirs.train(), ours.train()


def _same(theirs, ours, *args, **kwargs):
    with warnings.catch_warnings():  # torch.nn warns about mixed mask dtypes
        warnings.simplefilter("ignore")
        want = theirs(*args, **kwargs)
    assert_close(ours(*args, **kwargs), want, **TOL)


def _masks():
    g = torch.Generator().manual_seed(3)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    per_head = torch.rand(B * HEADS, S, S, generator=g) < 0.4
    per_head[:, :, 0] = False  # no fully masked row
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 3:] = True
    bias = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return causal, per_head, pad, bias


def _encoder_cases():
    causal, per_head, pad, bias = _masks()
    additive = torch.zeros(S, S, dtype=torch.float64).masked_fill(causal, float("-inf"))
    return {
        "bool causal": dict(src_mask=causal),
        "float -inf causal": dict(src_mask=additive),
        "float finite": dict(src_mask=bias(S, S)),
        "per-head float": dict(src_mask=bias(B * HEADS, S, S)),
        "per-head bool": dict(src_mask=per_head),
        "bool padding": dict(src_key_padding_mask=pad),
        "float padding (a bias)": dict(src_key_padding_mask=bias(B, S)),
        "float padding, bool mask": dict(src_mask=causal, src_key_padding_mask=bias(B, S)),
        "bool padding, float mask": dict(src_mask=bias(S, S), src_key_padding_mask=pad),
        "causal hint with its mask": dict(src_mask=causal, is_causal=True),
    }


@pytest.mark.parametrize("case", list(_encoder_cases()))
def test_encoder_layer_masks_as_torch_nn(case):
    theirs, ours = torch_twins("encoder")
    x = randn(B, S, D, dtype=torch.float64, mean=0.5)
    _same(theirs, ours, x, **_encoder_cases()[case])


def _decoder_cases():
    causal, per_head, pad, bias = _masks()
    memory_heads = per_head[:, :T, :]
    memory_causal = torch.ones(T, S, dtype=torch.bool).triu(1)  # what the hint promises
    return {
        "bool tgt_mask": dict(tgt_mask=causal[:T, :T]),
        "float tgt_mask": dict(tgt_mask=bias(T, T)),
        "causal hint with its mask": dict(tgt_mask=causal[:T, :T], tgt_is_causal=True),
        "float memory_mask": dict(memory_mask=bias(T, S)),
        "per-head bool memory_mask": dict(memory_mask=memory_heads),
        "memory hint with its mask": dict(memory_mask=memory_causal, memory_is_causal=True),
        "float tgt padding": dict(tgt_key_padding_mask=bias(B, T)),
        "bool memory padding": dict(memory_key_padding_mask=pad),
        "float memory padding": dict(memory_key_padding_mask=bias(B, S)),
    }


@pytest.mark.parametrize("case", list(_decoder_cases()))
def test_decoder_layer_masks_as_torch_nn(case):
    theirs, ours = torch_twins("decoder")
    tgt, memory = randn(B, T, D, dtype=torch.float64), randn(B, S, D, dtype=torch.float64)
    _same(theirs, ours, tgt, memory, **_decoder_cases()[case])


def test_inside_torch_stacks_with_float_padding_masks():
    """nn.TransformerEncoder turns its masks into floats before calling the layers."""
    theirs, _ = torch_twins("encoder")
    torch_stack = nn.TransformerEncoder(theirs, 2, enable_nested_tensor=False)
    ours = magnetize(copy.deepcopy(torch_stack), copy_weights=True, norm_scheme="pre")
    causal, _, pad, bias = _masks()
    x = randn(B, S, D, dtype=torch.float64)
    _same(torch_stack, ours, x, mask=causal, src_key_padding_mask=pad)
    _same(torch_stack, ours, x, src_key_padding_mask=bias(B, S))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_integer_masks_are_refused_by_magneto_nn(dtype):
    _, encoder = torch_twins("encoder")
    _, decoder = torch_twins("decoder")
    x, memory = randn(B, T, D, dtype=torch.float64), randn(B, S, D, dtype=torch.float64)
    square = torch.ones(T, T, dtype=dtype).triu(1)
    for layer, args, name, mask in (
        (encoder, (x,), "src_mask", square),
        (encoder, (x,), "src_key_padding_mask", torch.zeros(B, T, dtype=dtype)),
        (decoder, (x, memory), "tgt_mask", square),
        (decoder, (x, memory), "memory_mask", torch.zeros(T, S, dtype=dtype)),
        (decoder, (x, memory), "tgt_key_padding_mask", torch.zeros(B, T, dtype=dtype)),
        (decoder, (x, memory), "memory_key_padding_mask", torch.zeros(B, S, dtype=dtype)),
    ):
        with pytest.raises(ValueError, match=f"{name} must be bool.*{name}.bool()"):
            layer(*args, **{name: mask})


def test_memory_is_causal_needs_a_mask():
    _, decoder = torch_twins("decoder")
    with pytest.raises(ValueError, match="memory_is_causal=True needs memory_mask"):
        decoder(randn(B, T, D, dtype=torch.float64), randn(B, S, D, dtype=torch.float64),
                memory_is_causal=True)  # fmt: skip


def test_causal_hint_without_a_mask_is_causal():
    """Where torch.nn raises (slow path) or ignores the hint (fast path), magneto applies it."""
    theirs, ours = torch_twins("encoder")
    x = randn(B, S, D, dtype=torch.float64)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    assert_close(ours(x, is_causal=True), theirs(x, src_mask=causal), **TOL)


# ---------------------------------------------------------------------------------------------
# torchscale's entry points


def _torchscale_encoder():
    from torchscale.architecture.config import EncoderConfig
    from torchscale.architecture.encoder import Encoder

    torch.manual_seed(0)
    args = EncoderConfig(
        encoder_embed_dim=D, encoder_attention_heads=HEADS, encoder_ffn_embed_dim=FFN,
        encoder_layers=2, no_output_layer=True,
    )  # fmt: skip
    return perturb(Encoder(args)).double().eval()


@pytest.mark.parametrize(
    "masks",
    ["int attn_mask", "uint8 attn_mask", "int padding", "float 0/1 padding", "float attn_mask"],
)
def test_encoder_masks_as_torchscale(masks):
    """torchscale's Encoder reads its masks as nonzero = masked, whatever their dtype."""
    theirs = _torchscale_encoder()
    ours = from_torchscale(theirs)
    g = torch.Generator().manual_seed(4)
    x = randn(B, S, D, dtype=torch.float64, mean=0.2)
    zero_one = (torch.rand(S, S, generator=g) < 0.3).fill_diagonal_(False)
    pad = torch.zeros(B, S, dtype=torch.long)
    pad[2, 3:] = 1
    kwargs = {
        "int attn_mask": dict(attn_mask=zero_one.long()),
        "uint8 attn_mask": dict(attn_mask=zero_one.to(torch.uint8)),
        "int padding": dict(encoder_padding_mask=pad),
        "float 0/1 padding": dict(encoder_padding_mask=pad.double()),
        "float attn_mask": dict(attn_mask=zero_one.double() * 3.5),
    }[masks]
    # torchscale's own masked_fill fails on uint8 (-1e8 overflows): its int64 twin instead
    their_kwargs = {k: v.long() if v.dtype == torch.uint8 else v for k, v in kwargs.items()}
    want = theirs(None, token_embeddings=x, **their_kwargs)["encoder_out"]
    got = ours(None, token_embeddings=x, **kwargs)["encoder_out"]
    assert_close(got, want, **TORCHSCALE_TOL)


def test_decoder_layer_integer_mask_is_converted():
    """torchscale's DecoderLayer adds its self_attn_mask to the scores, so a 0/1 integer mask
    would mask nothing there; magneto reads it as nonzero = masked: torchscale's result for
    the same mask given as -inf/0 floats (and its padding masks, nonzero = padding)."""
    from torchscale.architecture.config import DecoderConfig
    from torchscale.architecture.decoder import DecoderLayer

    torch.manual_seed(0)
    args = DecoderConfig(
        decoder_embed_dim=D, decoder_attention_heads=HEADS, decoder_ffn_embed_dim=FFN,
        decoder_layers=1,
    )  # fmt: skip
    theirs = perturb(DecoderLayer(args, depth=0)).double().eval()
    config = magneto.MagnetoConfig(
        embed_dim=D, num_heads=HEADS, ffn_dim=FFN, decoder_layers=1, positions="none"
    )
    ours = magneto.DecoderLayer(config).double().eval()
    ours.load_state_dict(theirs.state_dict())
    x = randn(B, T, D, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.long).triu(1)
    pad = torch.zeros(B, T)
    pad[0, -1] = 1.0
    additive = torch.zeros(T, T, dtype=torch.float64).masked_fill(causal.bool(), float("-inf"))
    want = theirs(x, self_attn_mask=additive, self_attn_padding_mask=pad)[0]
    got = ours(x, self_attn_mask=causal, self_attn_padding_mask=pad)[0]
    assert_close(got, want, **TORCHSCALE_TOL)
    leaked = theirs(x, self_attn_mask=causal.double(), self_attn_padding_mask=pad)[0]
    assert not torch.allclose(leaked, want), "torchscale itself masks nothing with 0/1 values"


# ---------------------------------------------------------------------------------------------
# MultiheadAttention's own rules


def test_attention_reads_masks_by_dtype():
    torch.manual_seed(0)
    config = magneto.MagnetoConfig(embed_dim=D, num_heads=HEADS, ffn_dim=FFN, positions="none")
    mha = perturb(magneto.MultiheadAttention(config)).double()
    x = randn(B, S, D, dtype=torch.float64)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    want = mha(x, attn_mask=causal)[0]
    assert_close(mha(x, attn_mask=causal.long())[0], want, **TOL)
    assert_close(mha(x, attn_mask=causal.to(torch.uint8))[0], want, **TOL)
    bias = torch.randn(B, S, dtype=torch.float64)
    per_head = bias[:, None, None, :].expand(B, HEADS, S, S).reshape(B * HEADS, S, S)
    assert_close(mha(x, key_padding_mask=bias)[0], mha(x, attn_mask=per_head)[0], **TOL)
