"""The norm module every Magneto block uses: LayerNorm or RMSNorm through ``magneto_kernels``.

Parameter names (``weight``, ``bias``) match ``torch.nn.LayerNorm``, so torchscale checkpoints
load unchanged. Blocks rarely call a norm's ``forward``: they hand its parameters to the fused
ops (``magneto.fusion``), which is what lets a backend fuse the norm into the next projection.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import magneto_kernels
from magneto_kernels.codes import NORMS as OP_NORMS

NORMS = tuple(n for n in OP_NORMS if n != "none")
"""The norms a ``NormLayer`` (and ``MagnetoConfig.norm``) can be: the ops' norms but "none"."""


class NormLayer(nn.Module):
    """LayerNorm (``norm="layer"``: weight and bias) or RMSNorm (``norm="rms"``: weight only)."""

    def __init__(
        self, dim: int, eps: float = 1e-5, norm: str = "layer", backend: Optional[str] = None
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.dim, self.eps, self.norm, self.backend = dim, float(eps), norm, backend
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if norm == "layer" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return magneto_kernels.layer_norm(
            x, self.weight, self.bias, self.eps, norm=self.norm, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, norm={self.norm!r}"
