"""BitNet: Llama's block (``llama.py``) with ``attn_sub_norm`` fused into o_proj and
``down_proj(ffn_sub_norm(relu2(gate)·up))`` as one call ("relu2_glu").

Projections of transformers' quantised classes (``AutoBitLinear`` online and offline, packed
``BitLinear``) fuse the same four norm sites and both residual adds through their adapters
(``_projections``): ``ln_linear``'s quantised modes, q/k/v and gate/up each one quantised
``ln_linear_group`` (the normalised row quantised once for the group).
"""

from __future__ import annotations

from transformers.models.bitnet import modeling_bitnet as modeling

from .llama import FusedLlamaAttention, FusedLlamaDecoderLayer, FusedLlamaMLP


class _BitNetFamily:
    """What the shared forwards read of the family: its modeling module and RMSNorm class."""

    _modeling = modeling
    _rms_norm = modeling.BitNetRMSNorm


class MagnetoBitNetAttention(_BitNetFamily, FusedLlamaAttention, modeling.BitNetAttention):
    def _out_norm(self):
        return self.attn_sub_norm


class MagnetoBitNetMLP(_BitNetFamily, FusedLlamaMLP, modeling.BitNetMLP):
    def _down_norm(self):
        return self.ffn_sub_norm


class MagnetoBitNetDecoderLayer(_BitNetFamily, FusedLlamaDecoderLayer, modeling.BitNetDecoderLayer):
    pass


REPLACEMENTS = {
    modeling.BitNetAttention: MagnetoBitNetAttention,
    modeling.BitNetMLP: MagnetoBitNetMLP,
    modeling.BitNetDecoderLayer: MagnetoBitNetDecoderLayer,
}
"""transformers class -> the replacement ``apply_magneto`` gives its instances."""
