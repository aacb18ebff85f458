"""dgamma of bf16 Post-LN / DeepNorm encoders against the same model in float64, with and
without ``residual_in_fp32`` (docs/design.md, Numerics). Usage:

    python3 bench/precision_residual_in_fp32.py [backend ...]   (default: reference cpu)
"""

import sys

import torch

import magneto


def dgamma(scheme: str, dtype: torch.dtype, residual_in_fp32: bool, backend: str) -> torch.Tensor:
    torch.manual_seed(0)
    config = magneto.MagnetoConfig(
        embed_dim=256, num_heads=4, ffn_dim=512, encoder_layers=4, positions="none",
        norm_scheme=scheme, residual_in_fp32=residual_in_fp32, backend=backend,
    )  # fmt: skip
    model = magneto.Encoder(config)
    with torch.no_grad():  # norm weights off 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    model = model.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 64, 256, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    out = model(None, token_embeddings=x)["encoder_out"]
    (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).sum().backward()
    return torch.cat(
        [p.grad.double() for n, p in model.named_parameters() if n.endswith("norm.weight")]
    )


def main(backends):
    for scheme in ("post", "deepnorm"):
        want = dgamma(scheme, torch.float64, False, "reference")
        for backend in backends:
            errors = [
                ((dgamma(scheme, torch.bfloat16, flag, backend) - want).norm() / want.norm())
                for flag in (False, True)
            ]
            print(f"{scheme:8} {backend:9} dgamma relative error: bf16 residual {errors[0]:.2e}, "
                  f"residual_in_fp32 {errors[1]:.2e}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:] or ["reference", "cpu"])
