"""STAND-IN for ``timm.models.layers``: only ``drop_path``, the one function torchscale imports."""

import torch


def drop_path(
    x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> torch.Tensor:
    """Stochastic depth: zero whole samples (dim 0) with probability drop_prob, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        keep.div_(keep_prob)
    return x * keep
