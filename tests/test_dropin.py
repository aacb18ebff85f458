"""magneto.nn drop-in layers: torch.nn's constructor and forward signatures, masks as torch.nn
takes them, checked against a hand-written float64 Sub-LN block; magnetize swaps layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from harness import RTOL, assert_close, randn
from test_masks import torch_twins
from torch import nn

from magneto.nn import TransformerDecoderLayer, TransformerEncoderLayer, magnetize


def _ln(x, m):
    return F.layer_norm(x, (x.shape[-1],), m.weight, m.bias, m.eps)


def _attention(attn, q_in, kv_in, mask, heads):
    d = q_in.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = q_in @ w[:d].T + b[:d]
    k = kv_in @ w[d : 2 * d].T + b[d : 2 * d]
    v = kv_in @ w[2 * d :].T + b[2 * d :]
    split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads) + mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    if attn.inner_attn_ln is not None:
        out = _ln(out, attn.inner_attn_ln)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _ffn(ffn, x, act):
    u = act(x @ ffn.fc1.weight.T + ffn.fc1.bias)
    return _ln(u, ffn.ffn_layernorm) @ ffn.fc2.weight.T + ffn.fc2.bias


def _encoder_formula(layer, x, mask, act):
    """Sub-LN encoder layer in float64, batch-first x, additive mask (batch, 1, tgt, src)."""
    h = x + _attention(
        layer.self_attn,
        _ln(x, layer.self_attn_layer_norm),
        _ln(x, layer.self_attn_layer_norm),
        mask,
        layer.self_attn.num_heads,
    )
    return h + _ffn(layer.ffn, _ln(h, layer.final_layer_norm), act)


def _additive(bool_mask):
    return torch.zeros(bool_mask.shape, dtype=torch.float64).masked_fill(bool_mask, float("-inf"))


@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_layer_matches_formula_with_torch_masks(batch_first):
    torch.manual_seed(0)
    S, N, E, H = 6, 3, 16, 4
    layer = (
        TransformerEncoderLayer(
            E,
            H,
            dim_feedforward=24,
            dropout=0.0,
            activation="gelu",
            batch_first=batch_first,
            num_layers=4,
        )
        .double()
        .eval()
    )
    x = randn(N, S, E, mean=1.5, dtype=torch.float64)
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    want = _encoder_formula(
        layer, x, _additive(causal)[None, None] + _additive(pad)[:, None, None, :], F.gelu
    )
    src = x if batch_first else x.transpose(0, 1)
    for src_mask in (causal, _additive(causal)):  # bool (True = not allowed) and additive float
        out = layer(src, src_mask=src_mask, src_key_padding_mask=pad)
        out = out if batch_first else out.transpose(0, 1)
        assert_close(out, want, 1e-12)
    out = layer(src, src_key_padding_mask=pad, is_causal=True)
    assert_close(out if batch_first else out.transpose(0, 1), want, 1e-12)


def test_inside_torch_transformer_encoder_and_backward():
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, num_layers=3)
    encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    src = randn(5, 2, 16, mean=0.5)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = encoder(
        src, src_key_padding_mask=pad, mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    )
    assert out.shape == src.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_magnetize_encoder_copies_weights():
    torch.manual_seed(0)
    reference = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), num_layers=2, enable_nested_tensor=False
    )
    old_layers = list(reference.layers)
    model = magnetize(reference, copy_weights=True)
    assert all(isinstance(m, TransformerEncoderLayer) for m in model.layers)
    for new, old in zip(model.layers, old_layers):
        assert torch.equal(new.self_attn.in_proj_weight, old.self_attn.in_proj_weight)
        assert torch.equal(new.ffn.fc2.weight, old.linear2.weight)
        assert torch.equal(new.final_layer_norm.weight, old.norm2.weight)
        assert torch.equal(new.ffn.ffn_layernorm.weight, torch.ones(32))
    out = model(randn(4, 3, 16))
    assert out.shape == (4, 3, 16)


def test_magnetize_transformer_and_decoder_layer():
    torch.manual_seed(0)
    model = magnetize(
        nn.Transformer(
            16,
            2,
            num_encoder_layers=2,
            num_decoder_layers=3,
            dim_feedforward=32,
            dropout=0.0,
            batch_first=True,
        )
    )
    assert isinstance(model.decoder.layers[0], TransformerDecoderLayer)
    assert model.decoder.layers[0].config.encoder_layers == 2
    src, tgt = randn(2, 7, 16), randn(2, 5, 16)
    out = model(
        src,
        tgt,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
        src_key_padding_mask=torch.zeros(2, 7, dtype=torch.bool),
    )
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()


def test_decoder_layer_cross_attention_formula():
    torch.manual_seed(1)
    E, H = 8, 2
    layer = TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True).double().eval()
    tgt, mem = randn(2, 4, E, mean=1.0, dtype=torch.float64), randn(2, 6, E, dtype=torch.float64)
    mem_pad = torch.zeros(2, 6, dtype=torch.bool)
    mem_pad[1, -3:] = True
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    x = tgt + _attention(
        layer.self_attn,
        _ln(tgt, layer.self_attn_layer_norm),
        _ln(tgt, layer.self_attn_layer_norm),
        _additive(causal),
        H,
    )
    x = x + _attention(
        layer.encoder_attn,
        _ln(x, layer.encoder_attn_layer_norm),
        mem,
        _additive(mem_pad)[:, None, None, :],
        H,
    )
    want = x + _ffn(layer.ffn, _ln(x, layer.final_layer_norm), F.relu)
    out = layer(tgt, mem, tgt_mask=causal, memory_key_padding_mask=mem_pad)
    assert_close(out, want, 1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        TransformerEncoderLayer(10, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        TransformerEncoderLayer(8, 2, activation="tanh")  # a name the ops lack (torch: too)
    with pytest.raises(ValueError, match="src must have last dimension d_model=8"):
        TransformerEncoderLayer(8, 2)(randn(3, 2, 9))
    with pytest.raises(ValueError, match="module must be"):
        magnetize(nn.Linear(3, 3))


def test_unbatched_inputs_as_torch_nn():
    """(length, d_model) inputs with (length,) key padding masks and per-head masks
    (heads, tgt, src), as torch.nn takes them."""
    theirs, ours = torch_twins("encoder")
    x = randn(5, 16, dtype=torch.float64, mean=0.5)
    pad = torch.tensor([False, False, False, True, True])
    heads = torch.randn(4, 5, 5, dtype=torch.float64)
    for kwargs in (dict(), dict(src_key_padding_mask=pad), dict(src_mask=heads)):
        out = ours(x, **kwargs)
        assert out.shape == x.shape
        assert_close(out, theirs(x, **kwargs), RTOL[torch.float64], atol=1e-12)
    theirs, ours = torch_twins("decoder")
    tgt, memory = randn(4, 16, dtype=torch.float64), randn(5, 16, dtype=torch.float64)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    kwargs = dict(tgt_mask=causal, memory_key_padding_mask=pad)
    out = ours(tgt, memory, **kwargs)
    assert_close(out, theirs(tgt, memory, **kwargs), RTOL[torch.float64], atol=1e-12)


@pytest.mark.parametrize(
    "activation,fused",
    [
        (torch.relu, "relu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (F.silu, "silu"),
        (torch.tanh, None),
        (nn.Tanh(), None),
        (lambda t: t * torch.sigmoid(1.5 * t), None),
    ],
    ids=["torch.relu", "nn.GELU(tanh)", "F.silu", "torch.tanh", "nn.Tanh()", "lambda"],
)
def test_activation_callables_as_torch_nn(activation, fused):
    """What the fused ops have is fused under its name; any other callable runs unfused
    between fc1 and fc2 (fc2 keeps its fused norm and residual)."""
    theirs, ours = torch_twins("encoder", activation=activation)
    if fused:
        assert ours.ffn.activation == fused
    else:  # the callable itself (torch.nn's stack deep-copies a module one)
        assert type(ours.ffn.activation) is type(activation)
    x = randn(3, 5, 16, dtype=torch.float64, mean=0.5)
    assert_close(ours(x), theirs(x), RTOL[torch.float64], atol=1e-12)
