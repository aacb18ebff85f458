"""Kosmos-2.5's text decoder: Kosmos-2's (``kosmos2.py``) without the inner attention LN (out_proj
takes the residual and dropout only), with the query scaled before the attention, and blocks
without cross-attention."""

from __future__ import annotations

from torch import Tensor
from transformers.models.kosmos2_5 import modeling_kosmos2_5 as modeling

from ._blocks import Fused
from .kosmos2 import FusedKosmosAttention, FusedKosmosFFN, kosmos_pre_norm_block


class FusedKosmos2_5Attention(FusedKosmosAttention):
    """Kosmos-2's, with Kosmos-2.5's argument order (attention_mask before past_key_values)."""

    _scale_query = True

    def _out_norm(self):
        return None

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        past_key_values=None,
        **kwargs,
    ):
        return super().forward(
            hidden_states,
            encoder_hidden_states,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            **kwargs,
        )


class FusedKosmos2_5TextBlock(Fused):
    """Hands the norms, residuals and dropout to the patched self-attention and FFN."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask=None,
        past_key_values=None,
        use_cache=True,
        **kwargs,
    ) -> Tensor:
        return kosmos_pre_norm_block(
            self,
            hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )


class _Kosmos2_5Family:
    """What the shared forwards read of the family: its modeling module (LayerNorms only)."""

    _modeling = modeling


class MagnetoKosmos2_5TextAttention(
    _Kosmos2_5Family, FusedKosmos2_5Attention, modeling.Kosmos2_5TextAttention
):
    pass


class MagnetoKosmos2_5TextFFN(_Kosmos2_5Family, FusedKosmosFFN, modeling.Kosmos2_5TextFFN):
    pass


class MagnetoKosmos2_5TextBlock(
    _Kosmos2_5Family, FusedKosmos2_5TextBlock, modeling.Kosmos2_5TextBlock
):
    pass


REPLACEMENTS = {
    modeling.Kosmos2_5TextAttention: MagnetoKosmos2_5TextAttention,
    modeling.Kosmos2_5TextFFN: MagnetoKosmos2_5TextFFN,
    modeling.Kosmos2_5TextBlock: MagnetoKosmos2_5TextBlock,
}
"""transformers class -> the replacement ``apply_magneto`` gives its instances."""
