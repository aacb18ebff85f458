"""Magneto / DeepNorm initialisation, checked against models built by torchscale 0.3.0.

The per-parameter scale factors are measured on torchscale itself, not taken from our closed
forms: torchscale's Sub-LN / DeepNorm model divided elementwise by the Pre-LN model built from
the same seed (LayerNorms draw nothing, so both draw the same numbers before scaling).
"""

import math

import models
import pytest
import torch
from torchscale.architecture.decoder import Decoder as TSDecoder
from torchscale.architecture.encoder import Encoder as TSEncoder
from torchscale.architecture.encoder_decoder import EncoderDecoder as TSEncoderDecoder
from torchscale.component.embedding import TextEmbedding

import magneto
from magneto import init
from magneto.compat.torchscale import to_torchscale_state_dict

DEPTHS = (1, 6, 12, 24, 100)
D, HEADS, FFN, VOCAB = 8, 2, 16, 11
TS_FLAGS = {"subln": {}, "deepnorm": {"deepnorm": True}, "pre": {"subln": False}}


def _ts_model(arch, scheme, n, m, seed):
    torch.manual_seed(seed)
    flags = dict(TS_FLAGS[scheme], vocab_size=VOCAB, activation_fn="gelu")
    args = models.torchscale_config(arch, D, HEADS, FFN, (n, m), **flags)
    if arch == "encoder":
        return TSEncoder(args, TextEmbedding(VOCAB, D))
    if arch == "decoder":
        return TSDecoder(args, TextEmbedding(VOCAB, D))
    return TSEncoderDecoder(args, TextEmbedding(VOCAB, D), None, TextEmbedding(VOCAB, D))


def _magneto_model(arch, scheme, n, m, seed, **overrides):
    torch.manual_seed(seed)
    fixed = dict(encoder_layers=n, decoder_layers=m, vocab_size=VOCAB, positions="none")
    config = models.config(D, HEADS, FFN, overrides, **fixed, norm_scheme=scheme)
    if arch == "encoder_decoder":  # embeddings built first, as in _ts_model
        embeddings = magneto.TokenEmbedding(VOCAB, D), magneto.TokenEmbedding(VOCAB, D)
        return magneto.EncoderDecoder(config, embeddings[0], None, embeddings[1])
    return (magneto.Encoder if arch == "encoder" else magneto.Decoder)(config)


def _layer_stacks(model):
    if hasattr(model, "encoder"):
        return [model.encoder.layers, model.decoder.layers]
    return [model.layers]


def _cases():
    for arch in ("encoder", "decoder"):
        for depth in DEPTHS:
            yield arch, depth, depth
    for n in DEPTHS:
        for m in DEPTHS:
            yield "encoder_decoder", n, m


CASES = list(_cases())


@pytest.mark.parametrize("scheme", ["subln", "deepnorm"])
def test_torchscale_init_reproduces_torchscale(scheme):
    """init="torchscale" + the same seed = torchscale's parameters bit for bit, the same
    alphas, and the same random stream afterwards."""
    for arch, n, m in CASES:
        ts = _ts_model(arch, scheme, n, m, seed=n * 1000 + m)
        after_ts = torch.rand(4)
        mg = _magneto_model(arch, scheme, n, m, seed=n * 1000 + m, init="torchscale")
        after_mg = torch.rand(4)
        assert torch.equal(after_ts, after_mg), f"{arch} N={n} M={m}: random stream diverged"
        theirs, ours = ts.state_dict(), to_torchscale_state_dict(mg.state_dict())
        assert theirs.keys() == ours.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{arch} N={n} M={m} {key} differs"
        for ts_layers, mg_layers in zip(_layer_stacks(ts), _layer_stacks(mg)):
            for ts_layer, mg_layer in zip(ts_layers, mg_layers):
                assert mg_layer.alpha == pytest.approx(ts_layer.alpha, rel=1e-15)


def _torchscale_scale_factors(arch, scheme, n, m, seed):
    """{param name: the factor torchscale multiplied it by}, measured, not computed."""
    scaled = _ts_model(arch, scheme, n, m, seed).state_dict()
    plain = _ts_model(arch, "pre", n, m, seed).state_dict()
    factors = {}
    for key, value in plain.items():
        if key.endswith("weight") and value.dim() == 2 and "embed_tokens" not in key:
            ratio = scaled[key] / value
            assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)
            factors[key] = ratio.flatten()[0].item()
    return factors


@pytest.mark.parametrize(
    "scheme,beta", [("subln", None), ("deepnorm", "paper"), ("deepnorm", "torchscale")]
)
def test_paper_init_gains_match_torchscale_scale_factors(scheme, beta):
    """The paper init's gain on every projection = torchscale's measured factor (except the
    encoder beta of a DeepNorm encoder-decoder with beta="paper": 0.87/1.15 of torchscale's)."""
    # Every depth on each side of the encoder-decoder (the full cross runs in the test above).
    pairs = [("encoder_decoder", n, m) for n, m in zip(DEPTHS, DEPTHS[1:] + DEPTHS[:1])]
    for arch, n, m in [c for c in CASES if c[0] != "encoder_decoder"] + pairs:
        factors = _torchscale_scale_factors(arch, scheme, n, m, seed=7)
        scaled = to_torchscale_state_dict(
            _magneto_model(arch, scheme, n, m, seed=3, deepnorm_beta=beta).state_dict()
        )
        plain = to_torchscale_state_dict(
            _magneto_model(arch, "pre", n, m, seed=3, deepnorm_beta=beta).state_dict()
        )
        assert factors.keys() <= plain.keys()
        for key, factor in factors.items():
            if (
                beta == "paper"
                and scheme == "deepnorm"
                and arch == "encoder_decoder"
                and key.startswith("encoder.")
                and factor != 1.0
            ):
                factor *= 0.87 / 1.15
            ratio = scaled[key] / plain[key]
            torch.testing.assert_close(
                ratio,
                torch.full_like(ratio, factor),
                rtol=1e-5,
                atol=0,
                msg=lambda s: f"{arch} N={n} M={m} {key}: {s}",
            )


def test_paper_init_is_xavier_normal_with_zero_bias():
    torch.manual_seed(0)
    config = magneto.MagnetoConfig(
        embed_dim=96, num_heads=4, ffn_dim=192, encoder_layers=6, positions="none"
    )
    layer = magneto.Encoder(config).layers[0]
    gamma = math.sqrt(math.log(12))
    xavier = {"q": 1 / math.sqrt(96), "k": 1 / math.sqrt(96), "v": gamma / math.sqrt(96)}
    w = layer.self_attn.in_proj_weight
    for i, name in enumerate("qkv"):
        std = w[i * 96 : (i + 1) * 96].std().item()
        assert std == pytest.approx(xavier[name], rel=0.05), name
    assert layer.self_attn.out_proj.weight.std().item() == pytest.approx(
        gamma / math.sqrt(96), rel=0.05
    )
    fc_std = gamma * math.sqrt(2 / (96 + 192))
    assert layer.ffn.fc1.weight.std().item() == pytest.approx(fc_std, rel=0.05)
    assert layer.ffn.fc2.weight.std().item() == pytest.approx(fc_std, rel=0.05)
    for bias in (
        layer.self_attn.in_proj_bias,
        layer.self_attn.out_proj.bias,
        layer.ffn.fc1.bias,
        layer.ffn.fc2.bias,
    ):
        assert torch.count_nonzero(bias) == 0


@pytest.mark.parametrize("n,m", [(1, 1), (6, 12), (24, 6), (100, 100)])
def test_closed_forms_match_the_papers(n, m):
    """The formulas of docs/design.md, The model, written out independently."""
    s = init.layer_scales
    cfg = magneto.MagnetoConfig(encoder_layers=n, decoder_layers=m)
    assert s(cfg, "encoder").ffn ** 2 == pytest.approx(math.log(2 * n))
    assert s(cfg, "decoder").self_attn ** 2 == pytest.approx(math.log(2 * m))
    assert s(cfg, "encoder", True).ffn ** 2 == pytest.approx(math.log(3 * m) * math.log(2 * n) / 3)
    assert s(cfg, "decoder", True).ffn ** 2 == pytest.approx(math.log(3 * m))
    assert s(cfg, "decoder", True).cross_attn == 1.0
    deep = cfg.replace(norm_scheme="deepnorm")
    assert s(deep, "encoder").alpha == pytest.approx((2 * n) ** 0.25)
    assert s(deep, "encoder").ffn == pytest.approx((8 * n) ** -0.25)
    assert s(deep, "decoder").alpha == pytest.approx((2 * m) ** 0.25)
    assert s(deep, "encoder", True).alpha == pytest.approx(0.81 * (n**4 * m) ** (1 / 16))
    assert s(deep, "encoder", True).ffn == pytest.approx(0.87 * (n**4 * m) ** (-1 / 16))
    assert s(deep.replace(deepnorm_beta="torchscale"), "encoder", True).ffn == pytest.approx(
        1.15 * (n**4 * m) ** (-1 / 16)
    )
    assert s(deep, "decoder", True).alpha == pytest.approx((3 * m) ** 0.25)
    assert s(deep, "decoder", True).cross_attn == pytest.approx((12 * m) ** -0.25)
    for scheme in ("pre", "post"):
        assert s(cfg.replace(norm_scheme=scheme), "encoder", True) == init.LayerScales(1, 1, 1, 1)


def test_init_needs_layers_on_both_sides_of_an_encoder_decoder():
    with pytest.raises(ValueError, match="decoder_layers"):
        magneto.EncoderDecoder(
            magneto.MagnetoConfig(
                embed_dim=8, num_heads=2, ffn_dim=8, encoder_layers=2, decoder_layers=0
            )
        )
