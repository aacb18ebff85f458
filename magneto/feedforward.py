"""The feed-forward sublayer: fc1 writes the pre-activation, fc2 applies the activation on input.

Sub-LN (x the residual stream, ``preact`` the only tensor fc1 and fc2 share):

    preact = W_1 · LN_in(x) + b_1                                  (ln_linear, no activation)
    y = alpha·x + dropout( W_2 · LN_ffn( act(preact) ) + b_2 )     (ln_linear, input_activation)

Pre-LN drops ``LN_ffn`` (``ffn_layernorm``); Post-LN/DeepNorm also drop ``LN_in`` and add the
residual afterwards (``add_layer_norm``, in the layer).

Which path is fused (for fused backends):
- default (no activation dropout in training): both projections as above, the activation,
  the output dropout and the residual add inside ``ln_linear``;
- ``activation_dropout > 0`` while training: unfused fallback through the public ops:
  ``magneto_kernels.activation(preact, act)``, then ``magneto_kernels.dropout`` (the Philox mask the
  fused ops draw, seed from torch's generator), then fc2 as ``ln_linear`` without
  ``input_activation``;
- drop path is handled by the layer (it calls this module without ``residual``).

Why the activation sits on fc2's input: docs/design.md, The op contract.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

import magneto_kernels
from magneto.config import MagnetoConfig
from magneto.fusion import activate, project
from magneto.init import init_linear_, uninitialized_linear
from magneto.norm import NormLayer


class FeedForward(nn.Module):
    """``fc1`` (d -> ffn_dim), activation, ``ffn_layernorm`` (Sub-LN only), ``fc2`` (-> d).

    ``fc1``/``fc2`` are ``nn.Linear`` modules (torchscale's names) whose parameters the fused ops
    read (``magneto.fusion``: a module it cannot fuse is called instead); ``gain`` is their init
    gain (``magneto.init``).
    """

    def __init__(self, config: MagnetoConfig, gain: float = 1.0):
        super().__init__()
        self.config = config
        self.embed_dim, self.ffn_dim = config.embed_dim, config.ffn_dim
        self.activation = config.canonical_activation
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.backend = config.backend
        self.fc1 = uninitialized_linear(config.embed_dim, config.ffn_dim, bias=config.bias)
        self.fc2 = uninitialized_linear(config.ffn_dim, config.embed_dim, bias=config.bias)
        self.ffn_layernorm = (
            NormLayer(config.ffn_dim, config.eps, config.norm, config.backend)
            if config.norm_scheme == "subln"
            else None
        )
        self.reset_parameters(gain)

    def reset_parameters(self, gain: float = 1.0) -> None:
        """Init per ``config.init`` with ``gain`` on fc1 and fc2 (torchscale order: fc1, fc2)."""
        init_linear_(self.fc1.weight, self.fc1.bias, gain, self.config.init)
        init_linear_(self.fc2.weight, self.fc2.bias, gain, self.config.init)
        if self.ffn_layernorm is not None:
            self.ffn_layernorm.reset_parameters()

    def forward(
        self,
        x: Tensor,
        *,
        input_norm: Optional[nn.Module] = None,
        residual: Optional[Tensor] = None,
        alpha: float = 1.0,
        dropout_p: Optional[float] = None,
    ) -> Tensor:
        """``alpha·residual + dropout(fc2(LN_ffn(act(fc1(input_norm(x))))))``.

        Called as ``ffn(x)`` it is torchscale's ``FeedForwardNetwork`` (output dropout
        ``config.dropout`` in training). ``dropout_p`` overrides the output dropout.
        """
        if x.dim() < 1 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must have last dimension embed_dim={self.embed_dim}, got shape {tuple(x.shape)}"
            )
        if dropout_p is None:
            dropout_p = self.dropout if self.training else 0.0
        preact = project("FeedForward.fc1", x, self.fc1, input_norm, backend=self.backend)
        activation = self.activation
        if self.training and self.activation_dropout > 0.0:
            preact = activate(preact, activation)
            preact = magneto_kernels.dropout(preact, self.activation_dropout)
            activation = None
        return project(
            "FeedForward.fc2",
            preact,
            self.fc2,
            self.ffn_layernorm,
            input_activation=activation,
            residual=residual,
            alpha=alpha,
            dropout_p=dropout_p,
            backend=self.backend,
        )
