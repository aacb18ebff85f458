"""Llama: ``input_layernorm`` into q/k/v, ``post_attention_layernorm`` into gate/up, both residual
adds into o_proj and down_proj, and down_proj takes ``silu(gate)·up`` ("swiglu") in its prologue.

The mixins here also serve BitNet (``bitnet.py``), whose block is Llama's with a norm before each
output projection: ``_out_norm`` / ``_down_norm`` say which.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from transformers.models.llama import modeling_llama as modeling

from ._blocks import Fused, feed_forward, pre_norm_block, self_attention


class FusedLlamaAttention(Fused):
    """q/k/v from ``magneto_norm(hidden_states)``, rotary embeddings on q and k; o_proj (after
    ``_out_norm()``) with ``magneto_residual``."""

    def _out_norm(self) -> Optional[nn.Module]:
        return None

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        magneto_norm: Optional[nn.Module] = None,
        magneto_residual: Optional[Tensor] = None,
        magneto_dropout_p: float = 0.0,
        **kwargs,
    ):
        return self_attention(
            self,
            hidden_states,
            attention_mask,
            past_key_values,
            norm=magneto_norm,
            residual=magneto_residual,
            dropout_p=magneto_dropout_p,
            out_proj=self.o_proj,
            out_norm=self._out_norm(),
            attention_dropout=self.attention_dropout,
            rotary=position_embeddings,
            **kwargs,
        )


class FusedLlamaMLP(Fused):
    """gate/up from ``magneto_norm(x)``; down_proj (after ``_down_norm()``) with the gated
    activation in its prologue and ``magneto_residual``."""

    def _down_norm(self) -> Optional[nn.Module]:
        return None

    def forward(
        self,
        x: Tensor,
        magneto_norm: Optional[nn.Module] = None,
        magneto_residual: Optional[Tensor] = None,
    ) -> Tensor:
        return feed_forward(
            self,
            x,
            norm=magneto_norm,
            residual=magneto_residual,
            up=(self.gate_proj, self.up_proj),
            down=self.down_proj,
            down_norm=self._down_norm(),
            act_fn=self.act_fn,
            gated=True,
        )


class FusedLlamaDecoderLayer(Fused):
    """Hands the norms and residuals to the patched attention and MLP, which fuse them."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ) -> Tensor:
        return pre_norm_block(
            hidden_states,
            attention=self.self_attn,
            attention_norm=self.input_layernorm,
            mlp=self.mlp,
            mlp_norm=self.post_attention_layernorm,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )


class _LlamaFamily:
    """What the shared forwards read of the family: its modeling module and RMSNorm class."""

    _modeling = modeling
    _rms_norm = modeling.LlamaRMSNorm


class MagnetoLlamaAttention(_LlamaFamily, FusedLlamaAttention, modeling.LlamaAttention):
    pass


class MagnetoLlamaMLP(_LlamaFamily, FusedLlamaMLP, modeling.LlamaMLP):
    pass


class MagnetoLlamaDecoderLayer(_LlamaFamily, FusedLlamaDecoderLayer, modeling.LlamaDecoderLayer):
    pass


REPLACEMENTS = {
    modeling.LlamaAttention: MagnetoLlamaAttention,
    modeling.LlamaMLP: MagnetoLlamaMLP,
    modeling.LlamaDecoderLayer: MagnetoLlamaDecoderLayer,
}
"""transformers class -> the replacement ``apply_magneto`` gives its instances."""
