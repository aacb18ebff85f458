"""What magneto's own modules fuse, and what they do with modules they cannot fuse.

- The fused-call counts: each layer makes exactly the op calls docs/design.md (The model) lists.
"""

import collections

import pytest
import torch

import magneto
import magneto_kernels

D, HEADS, FFN = 16, 4, 24


def _config(**overrides):
    fields = dict(
        embed_dim=D,
        num_heads=HEADS,
        ffn_dim=FFN,
        encoder_layers=2,
        decoder_layers=2,
        positions="none",
        backend="reference",
    )
    fields.update(overrides)
    return magneto.MagnetoConfig(**fields)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of each public op the modules make."""
    calls = collections.Counter()
    for name in ("ln_linear", "add_layer_norm", "layer_norm", "activation", "dropout"):
        op = getattr(magneto_kernels, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(magneto_kernels, name, counted)
    return calls


# (scheme, ln_linear calls, add_layer_norm calls) of one layer: q/k/v packed in one GEMM, the
# norms inside the projections and the residual adds inside the last ones (Pre-LN, Sub-LN), or
# one add_layer_norm per residual (Post-LN, DeepNorm).
ENCODER_LAYER = {"subln": (4, 0), "pre": (4, 0), "post": (4, 2), "deepnorm": (4, 2)}
DECODER_LAYER = {"subln": (7, 0), "pre": (7, 0), "post": (7, 3), "deepnorm": (7, 3)}


@pytest.mark.parametrize("scheme", ENCODER_LAYER)
def test_encoder_layer_fused_calls(scheme, op_calls):
    layer = magneto.EncoderLayer(_config(norm_scheme=scheme, dropout=0.1)).train()
    layer(torch.randn(2, 5, D))
    ln_linear, add_layer_norm = ENCODER_LAYER[scheme]
    assert op_calls == collections.Counter(ln_linear=ln_linear, add_layer_norm=add_layer_norm)


@pytest.mark.parametrize("scheme", DECODER_LAYER)
def test_decoder_layer_fused_calls(scheme, op_calls):
    """Cross-attention: q from the decoder stream, k and v of the encoder output in one GEMM."""
    layer = magneto.DecoderLayer(_config(norm_scheme=scheme), is_encoder_decoder=True).eval()
    layer(torch.randn(2, 5, D), torch.randn(2, 6, D), self_attn_causal=True)
    ln_linear, add_layer_norm = DECODER_LAYER[scheme]
    assert op_calls == collections.Counter(ln_linear=ln_linear, add_layer_norm=add_layer_norm)


def test_stack_fuses_the_final_norm_into_the_output_projection(op_calls):
    decoder = magneto.Decoder(_config(vocab_size=30)).eval()
    decoder(torch.randint(0, 30, (2, 5)))
    assert op_calls == collections.Counter(ln_linear=2 * 4 + 1)


def test_multiway_split_fused_calls(op_calls):
    """A split sequence: every projection once per part, attention over both."""
    layer = magneto.EncoderLayer(_config(multiway=True)).eval()
    layer(torch.randn(2, 7, D), multiway_split_position=3)
    assert op_calls == collections.Counter(ln_linear=2 * 4)


def test_activation_dropout_runs_fc2_unfused_as_documented(op_calls):
    ffn = magneto.FeedForward(_config(activation_dropout=0.2)).train()
    ffn(torch.randn(2, 5, D))
    assert op_calls == collections.Counter(ln_linear=2, activation=1, dropout=1)
