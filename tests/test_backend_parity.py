"""Whole models give the same outputs and parameter gradients on every fused backend as the
float64 reference: encoder (with padding), decoder (and token-by-token decoding with the key/value
cache), encoder-decoder; Sub-LN, Pre-LN, Post-LN, DeepNorm; LayerNorm and RMSNorm. Tiny models:
the Triton backend runs in the interpreter here."""

import pytest
import torch
from harness import assert_close, require_backend

import magneto

FUSED = ("cpu", "triton")
VOCAB, PAD = 41, 1


def build(kind, backend, dtype=torch.float32, **overrides):
    config = dict(
        embed_dim=32,
        num_heads=2,
        ffn_dim=48,
        encoder_layers=2,
        decoder_layers=2,
        vocab_size=VOCAB,
        padding_idx=PAD,
        max_positions=64,
        backend=backend,
    )
    config.update(overrides)
    torch.manual_seed(0)
    cls = {
        "encoder": magneto.Encoder,
        "decoder": magneto.Decoder,
        "encoder_decoder": magneto.EncoderDecoder,
    }[kind]
    return cls(magneto.MagnetoConfig(**config)).to(dtype)


def inputs(batch=2, src_len=7, tgt_len=5):
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(2, VOCAB, (batch, src_len), generator=gen)
    src[1, -2:] = PAD
    tgt = torch.randint(2, VOCAB, (batch, tgt_len), generator=gen)
    return src, src == PAD, tgt


def forward(model, kind, src, src_pad, tgt):
    if kind == "encoder":
        return model(src, encoder_padding_mask=src_pad)["encoder_out"]
    if kind == "decoder":
        return model(tgt)[0]
    return model(src, tgt, encoder_padding_mask=src_pad)[0]


def _loss(out):
    weights = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    return (out * weights.to(out.dtype)).sum()


def check_parity(kind, backend, **overrides):
    model = build(kind, backend, **overrides)
    oracle = build(kind, "reference", torch.float64, **overrides)
    src, src_pad, tgt = inputs()
    out = forward(model, kind, src, src_pad, tgt)
    want = forward(oracle, kind, src, src_pad, tgt)
    assert_close(out, want, 1e-5, name=f"{kind} output")
    _loss(out).backward()
    _loss(want).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert_close(p.grad, q.grad, 1e-5, atol=1e-6, name=f"grad of {name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["encoder", "decoder", "encoder_decoder"])
@pytest.mark.parametrize("scheme", ["subln", "pre", "post", "deepnorm"])
def test_model_parity(backend, kind, scheme):
    require_backend(backend)
    check_parity(kind, backend, norm_scheme=scheme)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_model_parity_rmsnorm(backend, kind):
    require_backend(backend)
    check_parity(kind, backend, norm="rms", activation="swish")


@pytest.mark.parametrize("backend", FUSED)
def test_incremental_decoding_matches_full_reference(backend):
    require_backend(backend)
    model = build("decoder", backend).eval()
    oracle = build("decoder", "reference", torch.float64).eval()
    _, _, tgt = inputs(tgt_len=6)
    want = oracle(tgt)[0]
    state = {}
    with torch.no_grad():
        steps = [model(tgt[:, : t + 1], incremental_state=state)[0] for t in range(tgt.shape[1])]
    assert_close(torch.cat(steps, dim=1), want, 1e-5, name="token-by-token logits")


@pytest.mark.parametrize("backend", FUSED)
def test_training_with_dropout_matches_reference(backend):
    """Dropout seeds come from torch's generator and every backend draws the same Philox mask,
    so one seed gives the same training step on every backend."""
    require_backend(backend)
    drops = dict(dropout=0.2, attention_dropout=0.1, activation_dropout=0.1, drop_path=0.1)
    model = build("encoder_decoder", backend, **drops).train()
    oracle = build("encoder_decoder", "reference", **drops).train()
    src, src_pad, tgt = inputs()
    torch.manual_seed(5)
    out = forward(model, "encoder_decoder", src, src_pad, tgt)
    torch.manual_seed(5)
    want = forward(oracle, "encoder_decoder", src, src_pad, tgt)
    assert_close(out, want, 1e-5, name="output with dropout")
    _loss(out).backward()
    _loss(want).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, 1e-5, atol=1e-6, name=f"grad of {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("precision,rtol", [("highest", 1e-5), ("high", 2e-3)])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "encoder_decoder"])
def test_model_parity_gpu(backend, precision, rtol, kind):
    """On the GPU: exact fp32 products ("highest", PyTorch's default) and tf32 ("high")."""
    require_backend(backend, "cuda")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        model = build(kind, backend).cuda()
        oracle = build(kind, "reference", torch.float64)
        src, src_pad, tgt = inputs()
        out = forward(model, kind, src.cuda(), src_pad.cuda(), tgt.cuda())
        want = forward(oracle, kind, src, src_pad, tgt)
        assert_close(out, want, rtol, name=f"{kind} output ({precision})")
        _loss(out.cpu()).backward()
        _loss(want).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
            if q.grad is not None:
                assert_close(p.grad, q.grad, 10 * rtol, atol=1e-6, name=f"grad of {name}")
    finally:
        torch.set_float32_matmul_precision(previous)
