"""Kosmos-2's text decoder: pre-LN blocks. ``self_attn_layer_norm`` into q/k/v; ``inner_attn_ln``
into out_proj with the block's dropout and residual add; ``final_layer_norm`` into fc1;
``ffn_layernorm`` into fc2, with fc1's activation in its prologue, the dropout and the residual.

Left to transformers' code: the cross-attention sub-block (``encoder_attn``, no inner LN) and the
cross-attention ``x_attn`` of the image-to-text projection (an attention called with
``encoder_hidden_states``); the vision tower is not patched. The mixins here also serve
Kosmos-2.5 (``kosmos2_5.py``).
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor, nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.kosmos2 import modeling_kosmos2 as modeling

from ._blocks import Fused, feed_forward, pre_norm_block, self_attention


def kosmos_pre_norm_block(layer: nn.Module, hidden_states: Tensor, **kwargs) -> Tensor:
    """A Kosmos-2 / Kosmos-2.5 text layer's pre-norm block: its modules, by their names in
    transformers, handed to ``pre_norm_block`` with the call's own arguments."""
    return pre_norm_block(
        hidden_states,
        attention=layer.self_attn,
        attention_norm=layer.self_attn_layer_norm,
        mlp=layer.ffn,
        mlp_norm=layer.final_layer_norm,
        dropout_p=layer.dropout if layer.training else 0.0,
        **kwargs,
    )


class FusedKosmosAttention(Fused):
    """Self-attention: q/k/v from ``magneto_norm(hidden_states)``; out_proj (after
    ``_out_norm()``) with ``magneto_residual`` and ``magneto_dropout_p``."""

    _scale_query = False  # Kosmos-2.5 scales the query before the attention, not inside it

    def _out_norm(self) -> Optional[nn.Module]:
        return self.inner_attn_ln

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        past_key_values=None,
        attention_mask=None,
        magneto_norm: Optional[nn.Module] = None,
        magneto_residual: Optional[Tensor] = None,
        magneto_dropout_p: float = 0.0,
        **kwargs,
    ):
        if encoder_hidden_states is not None:  # cross-attention: transformers' own
            return super().forward(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                past_key_values=past_key_values,
                attention_mask=attention_mask,
                **kwargs,
            )
        if isinstance(past_key_values, EncoderDecoderCache):
            past_key_values = past_key_values.self_attention_cache
        return self_attention(
            self,
            hidden_states,
            attention_mask,
            past_key_values,
            norm=magneto_norm,
            residual=magneto_residual,
            dropout_p=magneto_dropout_p,
            out_proj=self.out_proj,
            out_norm=self._out_norm(),
            attention_dropout=self.dropout,
            scale_query=self._scale_query,
            **kwargs,
        )


class FusedKosmosFFN(Fused):
    """fc1 from ``magneto_norm(x)``; fc2 with the activation in its prologue, ffn_layernorm, the
    dropout and ``magneto_residual``. An active ``activation_dropout`` (training) runs unfused
    between the two, with the activation."""

    def forward(
        self,
        hidden_states: Tensor,
        magneto_norm: Optional[nn.Module] = None,
        magneto_residual: Optional[Tensor] = None,
    ) -> Tensor:
        return feed_forward(
            self,
            hidden_states,
            norm=magneto_norm,
            residual=magneto_residual,
            up=(self.fc1,),
            down=self.fc2,
            down_norm=self.ffn_layernorm,
            act_fn=self.activation_fn,
            dropout_p=self.dropout if self.training else 0.0,
            activation_dropout=self.activation_dropout if self.training else 0.0,
        )


class FusedKosmos2TextBlock(Fused):
    """Hands the norms, residuals and dropout to the patched self-attention and FFN; the
    cross-attention sub-block, where the call has ``encoder_hidden_states``, runs between them as
    transformers writes it."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        output_attentions=False,
        **kwargs,
    ) -> Tensor:
        cross_attention = None
        if encoder_hidden_states is not None:
            if not hasattr(self, "encoder_attn"):
                raise ValueError(
                    f"If `encoder_hidden_states` are passed, {self} has to be instantiated with"
                    " cross-attention layers by setting `config.add_cross_attention=True`"
                )
            cross_attention = functools.partial(
                self._cross_attention,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                past_key_values=past_key_values,
                output_attentions=output_attentions,
                **kwargs,
            )
        return kosmos_pre_norm_block(
            self,
            hidden_states,
            cross_attention=cross_attention,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            output_attentions=output_attentions,
            **kwargs,
        )

    def _cross_attention(self, hidden_states: Tensor, **kwargs) -> Tensor:
        residual = hidden_states
        hidden_states, _ = self.encoder_attn(
            hidden_states=self.encoder_attn_layer_norm(hidden_states), **kwargs
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        return residual + hidden_states


class _Kosmos2Family:
    """What the shared forwards read of the family: its modeling module (LayerNorms only)."""

    _modeling = modeling


class MagnetoKosmosTextAttention(
    _Kosmos2Family, FusedKosmosAttention, modeling.KosmosTextAttention
):
    pass


class MagnetoKosmos2TextFFN(_Kosmos2Family, FusedKosmosFFN, modeling.Kosmos2TextFFN):
    pass


class MagnetoKosmos2TextBlock(_Kosmos2Family, FusedKosmos2TextBlock, modeling.Kosmos2TextBlock):
    pass


REPLACEMENTS = {
    modeling.KosmosTextAttention: MagnetoKosmosTextAttention,
    modeling.Kosmos2TextFFN: MagnetoKosmos2TextFFN,
    modeling.Kosmos2TextBlock: MagnetoKosmos2TextBlock,
}
"""transformers class -> the replacement ``apply_magneto`` gives its instances."""
