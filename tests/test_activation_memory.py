"""Bytes saved for backward by one Magneto encoder layer with its final LayerNorm, in training,
on the default CPU backend: docs/design.md (Memory accounting) counts 10 d-vectors per token,
torchscale saves 24."""

import models
import torch

import magneto
import magneto_kernels
from magneto.profiling import saved_tensor_bytes

D, HEADS, FFN, T, BATCH = 256, 4, 1024, 128, 2


def _saved_bytes(encoder):
    encoder.train()
    x = torch.randn(BATCH, T, D, requires_grad=True)
    nbytes, _ = saved_tensor_bytes(
        lambda: encoder(None, token_embeddings=x)["encoder_out"], exclude=[*encoder.parameters(), x]
    )
    return nbytes


def test_fused_encoder_layer_saves_ten_d_vectors_per_token():
    assert magneto_kernels.resolve_backend(None, torch.empty(1)) == "cpu", (
        "the default CPU backend should be the fused C++ one"
    )
    torch.manual_seed(0)
    config = magneto.MagnetoConfig(
        embed_dim=D, num_heads=HEADS, ffn_dim=FFN, encoder_layers=1, positions="none"
    )
    nbytes = _saved_bytes(magneto.Encoder(config))
    per_token = nbytes / (BATCH * T)
    # q, k, v (one packed storage, 3), the attention output (1), the residual stream after
    # attention (1), preact shared by fc1 and fc2 (4), the final LayerNorm's input (1):
    # 10 d-vectors.
    # Plus fp32 (mean, rstd) of five LayerNorms and SDPA's per-head logsumexp.
    expected = 10 * D * 4 + 5 * 2 * 4 + HEADS * 4
    assert per_token == expected, f"saved {per_token} bytes per token, expected {expected}"


def test_torchscale_saves_24_d_vectors_per_token():
    from torchscale.architecture.encoder import Encoder

    torch.manual_seed(0)
    args = models.torchscale_config("encoder", D, HEADS, FFN, 1, subln=True, no_output_layer=True)
    encoder = Encoder(args)
    assert round(_saved_bytes(encoder) / (BATCH * T * D * 4)) == 24
