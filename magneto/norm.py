"""The norm module every Magneto block uses: LayerNorm or RMSNorm through ``magneto_kernels``.

Parameter names (``weight``, ``bias``) match ``torch.nn.LayerNorm``, so torchscale checkpoints
load unchanged. Blocks rarely call a norm's ``forward``: they hand its parameters to the fused
ops (``norm_kwargs``), which is what lets a backend fuse the norm into the next projection.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import magneto_kernels


class Norm(nn.Module):
    """LayerNorm (``kind="layer"``: weight and bias) or RMSNorm (``kind="rms"``: weight only)."""

    def __init__(
        self, dim: int, eps: float = 1e-5, kind: str = "layer", backend: Optional[str] = None
    ):
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
        self.dim, self.eps, self.kind, self.backend = dim, float(eps), kind, backend
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if kind == "layer" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return magneto_kernels.layer_norm(
            x, self.weight, self.bias, self.eps, norm=self.kind, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, kind={self.kind!r}"


def norm_kwargs(norm: Optional[Norm]) -> dict:
    """``ln_linear`` arguments for an optional norm in front of a projection."""
    if norm is None:
        return {"ln_weight": None, "ln_bias": None}
    return {"ln_weight": norm.weight, "ln_bias": norm.bias, "eps": norm.eps, "norm": norm.kind}
