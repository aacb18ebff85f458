"""The forwards every family shares: self-attention, feed-forward and the pre-norm block.

A block hands its sub-blocks the norm before them and the residual (and dropout) after them
(``magneto_norm``, ``magneto_residual``, ``magneto_dropout_p``); the sub-block fuses the norm
into its first projections and the residual add into its output projection. A family module
supplies only what differs: its transformers modeling module and RMSNorm class (``Fused``), the
rotary embedding or query scaling, and the norm, if any, before each output projection.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from ._projections import MagnetoOptions, apply_activation, output_projection, project


class Fused:
    """Base of the families' mixins: what the shared forwards read from a patched module. The
    family's replacement classes set the first two; ``apply_magneto`` the instance's options."""

    _modeling = None  # the transformers modeling module: attention functions, rotary embedding
    _rms_norm: Optional[type] = None  # the family's RMSNorm class (None: LayerNorm only)
    _magneto_options = MagnetoOptions()


def self_attention(
    module: Fused,
    hidden_states: Tensor,
    attention_mask,
    cache,
    *,
    norm: Optional[nn.Module],
    residual: Optional[Tensor],
    dropout_p: float,
    out_proj: nn.Module,
    out_norm: Optional[nn.Module],
    attention_dropout: float,
    rotary=None,
    scale_query: bool = False,
    **kwargs,
):
    """``(residual + dropout(out_proj(out_norm(attention(q, k, v)))), attention weights)`` with
    q/k/v projected from ``norm(hidden_states)``. What differs by family: ``rotary`` (Llama's
    ``(cos, sin)``, applied to q and k), ``scale_query`` (Kosmos-2.5 scales q before the
    attention instead of inside it), the attention dropout and ``out_norm``."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    qkv = project(module, hidden_states, norm, (module.q_proj, module.k_proj, module.v_proj))
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in qkv)
    if rotary is not None:
        q, k = module._modeling.apply_rotary_pos_emb(q, k, *rotary)
    scaling = module.scaling
    if scale_query:
        q, scaling = scaling * q, 1.0
    if cache is not None:
        k, v = cache.update(k, v, module.layer_idx)
    attention = module._modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, module._modeling.eager_attention_forward
    )
    out, weights = attention(
        module,
        q,
        k,
        v,
        attention_mask,
        dropout=attention_dropout if module.training else 0.0,
        scaling=scaling,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    out = output_projection(
        module, out, out_proj, norm=out_norm, residual=residual, dropout_p=dropout_p
    )
    return out, weights


def feed_forward(
    module: Fused,
    x: Tensor,
    *,
    norm: Optional[nn.Module],
    residual: Optional[Tensor],
    up: tuple,
    down: nn.Module,
    down_norm: Optional[nn.Module],
    act_fn: nn.Module,
    gated: bool = False,
    dropout_p: float = 0.0,
    activation_dropout: float = 0.0,
) -> Tensor:
    """``residual + dropout(down(down_norm(act(up(norm(x))))))``: the projections ``up`` (gate/up
    for ``gated``, whose activation is ``act(gate)·up``; fc1 otherwise) from the fused norm, and
    the activation in the prologue of the fused down projection. An ``activation_dropout`` sits
    between the activation and ``down_norm``, where no op can put it: the activation and that
    dropout then run unfused between the two projections."""
    h = project(module, x, norm, up, concat=True)
    if activation_dropout > 0.0:
        h = nn.functional.dropout(apply_activation(h, act_fn, gated), activation_dropout, True)
        act_fn = None
    return output_projection(
        module,
        h,
        down,
        norm=down_norm,
        act_fn=act_fn,
        gated=gated,
        residual=residual,
        dropout_p=dropout_p,
    )


def pre_norm_block(
    hidden_states: Tensor,
    *,
    attention: nn.Module,
    attention_norm: nn.Module,
    mlp: nn.Module,
    mlp_norm: nn.Module,
    dropout_p: float = 0.0,
    cross_attention: Optional[Callable[[Tensor], Tensor]] = None,
    **attention_kwargs,
) -> Tensor:
    """``h = x + dropout(attention(attention_norm(x)))``, then ``cross_attention(h)`` where given
    (it runs unfused), then ``h + mlp(mlp_norm(h))``; each norm and residual add is fused by the
    patched sub-block it is handed to."""
    hidden_states, _ = attention(
        hidden_states=hidden_states,
        magneto_norm=attention_norm,
        magneto_residual=hidden_states,
        magneto_dropout_p=dropout_p,
        **attention_kwargs,
    )
    if cross_attention is not None:
        hidden_states = cross_attention(hidden_states)
    return mlp(hidden_states, magneto_norm=mlp_norm, magneto_residual=hidden_states)
