"""magneto.embedding_norm against torchscale 0.3.0's embedding path with ``layernorm_embedding``:
the encoder's and decoder's ``forward_embedding`` output (prefill and a decoding step) and its
gradients, the norm run by magneto's norm module on the torchscale model's parameters."""

import pytest
import torch
from harness import assert_close
from torchscale.architecture.config import DecoderConfig, EncoderConfig
from torchscale.architecture.decoder import Decoder as TSDecoder
from torchscale.architecture.encoder import Encoder as TSEncoder
from torchscale.component.embedding import PositionalEmbedding, TextEmbedding

from magneto.embedding_norm import embedding_output
from magneto.norm import NormLayer

D, VOCAB = 16, 30


def _config(kind, **options):
    sizes = dict(embed_dim=D, attention_heads=2, ffn_embed_dim=32, layers=1)
    config = EncoderConfig if kind == "encoder" else DecoderConfig
    return config(
        **{f"{kind}_{k}": v for k, v in sizes.items()}, layernorm_embedding=True, **options
    )


def _model(kind, **options):
    torch.manual_seed(0)
    cls = TSEncoder if kind == "encoder" else TSDecoder
    model = cls(_config(kind, **options), TextEmbedding(VOCAB, D), PositionalEmbedding(40, D))
    with torch.no_grad():  # norm parameters off their identity init
        model.layernorm_embedding.weight.normal_(1.0, 0.3)
        model.layernorm_embedding.bias.normal_(0.0, 0.3)
    return model


def _norm_from(model):
    ts_norm = model.layernorm_embedding
    norm = NormLayer(D, ts_norm.eps)
    norm.load_state_dict(ts_norm.state_dict(), strict=True)
    return norm


def _grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("options", [{}, {"no_scale_embedding": False}], ids=["", "scaled"])
def test_prefill_embedding_is_torchscales(kind, options):
    model = _model(kind, **options)
    norm = _norm_from(model)
    tokens = torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    dy = torch.randn(3, 7, D)

    x_ts, _ = model.forward_embedding(tokens)
    x_ts.backward(dy)
    expected = _grads(model.embed_tokens, model.embed_positions, model.layernorm_embedding)
    model.zero_grad()

    embed = model.embed_scale * model.embed_tokens(tokens)
    x = embedding_output(embed, model.embed_positions(tokens), norm, model.dropout_module)
    assert_close(x, x_ts, 1e-6)
    x.backward(dy)
    got = _grads(model.embed_tokens, model.embed_positions, norm)
    for name, a, b in zip(("tokens", "positions", "ln weight", "ln bias"), got, expected):
        assert_close(a, b, 1e-6, name=name)


def test_decoding_step_normalises_the_new_row():
    """A decoding step after the first: torchscale embeds the whole prefix, keeps the last
    token and its position, then normalises that row."""
    model = _model("decoder", no_scale_embedding=False)
    norm = _norm_from(model)
    tokens = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    x_ts, _ = model.forward_embedding(tokens, incremental_state={"is_first_step": False})
    embed = model.embed_scale * model.embed_tokens(tokens[:, -1:])
    positions = model.embed_positions(tokens)[:, -1:]
    assert_close(embedding_output(embed, positions, norm), x_ts, 1e-6)


def test_token_embeddings_without_positions():
    """``token_embeddings`` given and no position module: the norm alone."""
    torch.manual_seed(0)
    model = TSEncoder(_config("encoder"))
    token_embeddings = torch.randn(2, 5, D) * 3 + 1
    x_ts, _ = model.forward_embedding(None, token_embeddings)
    assert_close(embedding_output(token_embeddings, None, _norm_from(model)), x_ts, 1e-6)


def test_training_dropout_follows_the_norm():
    """dropout(LN(x)), not LN(dropout(x)): the same torch generator draws give torchscale's."""
    model = _model("encoder", dropout=0.3).train()
    norm = _norm_from(model)
    tokens = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    x_ts, _ = model.forward_embedding(tokens)
    torch.manual_seed(4)
    embed = model.embed_tokens(tokens)
    x = embedding_output(embed, model.embed_positions(tokens), norm, model.dropout_module)
    assert_close(x, x_ts, 1e-6)
    assert (x == 0).any()
