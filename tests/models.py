"""Small models for the module tests: one config builder and one way to move a model's
parameters off their init (a freshly built model has norm weights 1 and biases 0, which hide
mistakes in how they are used)."""

import torch

import magneto


def config(embed_dim, num_heads, ffn_dim, overrides=None, **defaults) -> magneto.MagnetoConfig:
    """A MagnetoConfig of these widths with the test file's ``defaults``, then a test's
    ``overrides`` (widths included) on top."""
    fields = dict(embed_dim=embed_dim, num_heads=num_heads, ffn_dim=ffn_dim, **defaults)
    return magneto.MagnetoConfig(**{**fields, **(overrides or {})})


@torch.no_grad()
def perturb(module, seed=0):
    """Every parameter moved off its init (norm weights off 1, biases off 0, class and mask
    tokens off 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def rel_err(ours, theirs) -> float:
    """‖ours − theirs‖ / ‖theirs‖ in float64, for a model-level comparison with torchscale."""
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


def torchscale_config(kind, embed_dim, heads, ffn_dim, layers, **options):
    """torchscale 0.3.0's config for a model of ``kind`` ("encoder", "decoder", otherwise an
    encoder-decoder), these sizes on each side it has; ``layers``: one depth for every side,
    or (encoder's, decoder's)."""
    from torchscale.architecture.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig

    n, m = layers if isinstance(layers, tuple) else (layers, layers)
    sides = {"encoder": {"encoder": n}, "decoder": {"decoder": m}}.get(
        kind, {"encoder": n, "decoder": m}
    )
    sizes = {}
    for side, depth in sides.items():
        dims = dict(embed_dim=embed_dim, attention_heads=heads, ffn_embed_dim=ffn_dim, layers=depth)
        sizes.update({f"{side}_{k}": v for k, v in dims.items()})
    config = {"encoder": EncoderConfig, "decoder": DecoderConfig}.get(kind, EncoderDecoderConfig)
    return config(**sizes, **options)
