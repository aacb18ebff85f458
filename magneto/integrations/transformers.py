"""magneto's fused ops in Hugging Face ``transformers`` models: Llama, BitNet, Kosmos-2, Kosmos-2.5.

``apply_magneto(model)`` patches an instantiated model in place; ``apply_magneto_to_llama()``
(``_bitnet``, ``_kosmos2``, ``_kosmos2_5``) patches the classes of a modeling module so that
models built afterwards (``from_pretrained`` included) come patched. The results, state-dict
keys, checkpoints and training loop stay those of the model as transformers defines it.

How: each replacement class subclasses the transformers class it replaces, keeps its
submodules and parameters and overrides ``forward`` only. An instance is patched by setting
``module.__class__``, a modeling module by assigning the replacement to the original's name.
Subclassing keeps what transformers attaches to the classes: ``GradientCheckpointingLayer``
wraps the ``forward`` of every subclass (so checkpointing survives), output recording
(``output_attentions``, ``output_hidden_states``) matches modules by ``isinstance``, and
``save_pretrained`` / ``from_pretrained`` see the same keys. Patching twice is a no-op.

What runs fused (``magneto_kernels.ln_linear``; the norm is recomputed inside each call, so the
normalised activations are never stored for backward):

- every family: the block's pre-norm into its input projections (``input_layernorm`` /
  ``self_attn_layer_norm`` into q/k/v, ``post_attention_layernorm`` / ``final_layer_norm`` into
  gate/up or fc1); the residual add of both sub-blocks, inside the output projection's call.
- Llama: down_proj takes ``act(gate)·up`` in its prologue ("swiglu" for SiLU).
- BitNet: ``attn_sub_norm`` into o_proj; ``down_proj(ffn_sub_norm(relu2(gate)·up))`` as one call
  ("relu2_glu").
- Kosmos-2: ``inner_attn_ln`` into out_proj, with the block's dropout; ``ffn_layernorm`` into
  fc2, with fc1's activation as its input activation and the FFN's dropout.
- Kosmos-2.5 (no inner attention LN): out_proj with the residual and dropout; the FFN as
  Kosmos-2's.

gate/up (and q/k/v) are one call per projection, their outputs concatenated, where a gradient
is recorded or rows < in_features (decode); otherwise one call on their weights concatenated at
call time (``torch.cat``; autograd would split the gradient). ``MagnetoOptions.concat_min_rows``
sets another threshold and says why this one.

Left unfused, running the model's own code:

- projections that are not a plain ``nn.Linear`` (or carry forward hooks) at call time: BitNet's
  quantised ``AutoBitLinear`` / ``BitLinear``, PEFT's LoRA layers (which then work as usual,
  fed by the norm module's own output) and offloading hooks; ``apply_magneto`` logs those it
  finds. Likewise norms without an affine weight.
- Kosmos-2's cross-attention (``encoder_attn``, no inner LN) and the cross-attention ``x_attn``
  of both models' image-to-text projection; the vision towers are left alone.
- Kosmos-2's ``activation_dropout`` (between the activation and ``ffn_layernorm``) when it is
  active in training: the activation and that dropout then run unfused between fc1 and fc2
  (ffn_layernorm stays fused into fc2).
- activations the ops do not have: the model's own activation runs unfused before the fused
  norm and projection.

Numerics: in float32 the results match transformers' to rounding. Llama's and BitNet's RMSNorm
rounds the normalised row to the input dtype before multiplying by its weight; the fused op
multiplies in float32 and rounds once, so in bf16/fp16 the two differ by one rounding. Dropout
draws magneto's Philox masks from torch's generator (reproducible from ``torch.manual_seed``),
not torch's masks, so a patched model trains with other masks than the unpatched one.

Module outputs: a patched attention module returns ``residual + attention output`` as its
first output (the residual add is folded into its output projection); the attention weights
(its second output, which ``output_attentions`` records) are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import activations
from transformers.cache_utils import EncoderDecoderCache

import magneto_kernels
from magneto_kernels.codes import GATED_ACTIVATIONS

logger = logging.getLogger(__name__)

MODEL_TYPES = {
    "llama": "llama",
    "bitnet": "bitnet",
    "kosmos-2": "kosmos2",
    "kosmos_2_text_model": "kosmos2",
    "kosmos-2.5": "kosmos2_5",
    "kosmos_2_5_text_model": "kosmos2_5",
}
"""``config.model_type`` -> the family of replacement classes that patches it."""

_MODELING = {
    "llama": "transformers.models.llama.modeling_llama",
    "bitnet": "transformers.models.bitnet.modeling_bitnet",
    "kosmos2": "transformers.models.kosmos2.modeling_kosmos2",
    "kosmos2_5": "transformers.models.kosmos2_5.modeling_kosmos2_5",
}


@dataclasses.dataclass(frozen=True)
class MagnetoOptions:
    """How a patched model calls the fused ops.

    backend: the ``magneto_kernels`` backend of every call (None: the ops' own choice,
        ``MAGNETO_BACKEND`` or the fastest available).
    concat_min_rows: from this many rows (tokens in the call) on, gate/up and q/k/v run as one
        call on their weights concatenated at call time; below it, one call per projection
        (the norm recomputed in each) and their outputs concatenated. None (the default): one
        call only where no gradient is recorded and rows >= in_features. Why: the two ways
        copy either the weights (2·ffn × hidden for gate/up) or the outputs (rows × 2·ffn), so
        copying the smaller one means concatenating weights from rows = in_features on; and
        where a gradient is recorded, the concatenated weight is a new tensor that ln_linear
        keeps for backward, one more weight-sized tensor per projection group and layer (in
        bench/bench_transformers.py's Kosmos-2 layer, 512 tokens: 24640 B/token saved with
        it, 18512 without), while separate calls share one saved x and add only their row
        statistics. Next to the GEMMs either copy is O(1/hidden) of the work in training and
        prefill; at decode (a few rows) the GEMMs only stream the weights, and copying them
        as well would double that traffic.
    """

    backend: Optional[str] = None
    concat_min_rows: Optional[int] = None


_DEFAULT_OPTIONS = MagnetoOptions()

# ----------------------------------------------------------------------------------------------
# The fused pieces every family is assembled from.

_RMS_NORMS: tuple = ()  # the families' RMSNorm classes, added as each family is built
_NO_NORM = (None, None, 0.0, "layer")


def _norm_args(norm: Optional[nn.Module]):
    """``(ln_weight, ln_bias, eps, norm kind)`` of a norm module ln_linear can recompute, None
    for one it cannot (it then runs as a module)."""
    if norm is None:
        return _NO_NORM
    if norm._forward_hooks or norm._forward_pre_hooks:
        return None
    kind = type(norm)
    if kind is nn.LayerNorm:
        if norm.weight is None or len(norm.normalized_shape) != 1:
            return None
        return norm.weight, norm.bias, norm.eps, "layer"
    if kind in _RMS_NORMS:
        return norm.weight, None, norm.variance_epsilon, "rms"
    return None


def _plain(linear: nn.Module, x: Tensor) -> bool:
    """Whether ``linear`` is an ``nn.Linear`` whose weight ln_linear can read directly: not a
    quantised or adapter subclass or wrapper, nor hooked (offloading hooks move its weight)."""
    return (
        type(linear) is nn.Linear
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
        and linear.weight.dtype == x.dtype
    )


def _call(x, nargs, weight, bias, options, **kwargs) -> Tensor:
    ln_weight, ln_bias, eps, norm = nargs
    return magneto_kernels.ln_linear(
        x, ln_weight, ln_bias, weight, bias, eps=eps, norm=norm, backend=options.backend, **kwargs
    )


def _cat_bias(linears) -> Optional[Tensor]:
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [
            torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
            if b is None
            else b
            for lin, b in zip(linears, biases)
        ]
    )


def _concat_weights(x: Tensor, linears, options: MagnetoOptions) -> bool:
    """Whether to run projections of one input as one call on concatenated weights
    (``MagnetoOptions.concat_min_rows`` says when and why)."""
    rows = x.numel() // x.shape[-1]
    if options.concat_min_rows is not None:
        return rows >= options.concat_min_rows
    if torch.is_grad_enabled() and (
        x.requires_grad or any(linear.weight.requires_grad for linear in linears)
    ):
        return False
    return rows >= x.shape[-1]


def _project(x: Tensor, norm, linears, options: MagnetoOptions, *, concat: bool):
    """``[linear(norm(x)) for linear in linears]``, each fused with the norm where it can be;
    ``concat``: the outputs concatenated along the last dimension instead."""
    nargs = _norm_args(norm)
    plain = [nargs is not None and _plain(linear, x) for linear in linears]
    if all(plain) and len(linears) > 1 and _concat_weights(x, linears, options):
        weight = torch.cat([linear.weight for linear in linears])
        y = _call(x, nargs, weight, _cat_bias(linears), options)
        return y if concat else y.split([linear.out_features for linear in linears], dim=-1)
    outs, h = [], None
    for linear, fused in zip(linears, plain):
        if fused:
            outs.append(_call(x, nargs, linear.weight, linear.bias, options))
        else:
            if h is None:  # the norm's own output, computed once for every unfused projection
                h = x if norm is None else norm(x)
            outs.append(linear(h))
    return torch.cat(outs, dim=-1) if concat else outs


def _activation_name(act_fn: Optional[nn.Module]) -> Optional[str]:
    """The ops' name for a transformers activation module, None for one they do not have."""
    kind = type(act_fn)
    if kind is activations.GELUActivation:
        return "gelu"  # erf GELU, whether torch's or the Python formula
    if kind in (activations.GELUTanh, activations.NewGELUActivation):
        return "gelu_tanh"
    if kind in (nn.SiLU, activations.SiLUActivation):
        return "silu"
    if kind is nn.ReLU:
        return "relu"
    if kind is activations.ReLUSquaredActivation:
        return "relu2"
    return None


_GATED_OF = {gate: gated for gated, gate in GATED_ACTIVATIONS.items()}


def _apply_activation(x: Tensor, act_fn: nn.Module, gated: bool) -> Tensor:
    if not gated:
        return act_fn(x)
    gate, up = x.chunk(2, dim=-1)
    return act_fn(gate) * up


def _output_projection(
    x: Tensor,
    linear: nn.Module,
    options: MagnetoOptions,
    *,
    norm: Optional[nn.Module] = None,
    act_fn: Optional[nn.Module] = None,
    gated: bool = False,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``residual + dropout(linear(norm(a)))`` with ``a = act_fn(x)``, or ``act_fn(gate)·up`` for
    ``gated`` (x = [gate | up]); as one ln_linear where linear and norm allow it."""
    in_act = None
    if act_fn is not None:
        name = _activation_name(act_fn)
        in_act = _GATED_OF.get(name) if gated else name
        if in_act is None:  # an activation the ops lack runs as the model's module
            x, act_fn = _apply_activation(x, act_fn, gated), None
    nargs = _norm_args(norm)
    if nargs is not None and _plain(linear, x):
        return _call(
            x,
            nargs,
            linear.weight,
            linear.bias,
            options,
            input_activation=in_act,
            residual=residual,
            dropout_p=dropout_p,
        )
    if act_fn is not None:
        x = _apply_activation(x, act_fn, gated)
    if norm is not None:
        x = norm(x)
    y = magneto_kernels.dropout(linear(x), dropout_p)
    return y if residual is None else residual + y


def _options(module: nn.Module) -> MagnetoOptions:
    return getattr(module, "_magneto_options", _DEFAULT_OPTIONS)


# ----------------------------------------------------------------------------------------------
# Llama and BitNet: the same pre-norm block; BitNet adds attn_sub_norm and ffn_sub_norm.


class _LlamaLikeAttention:
    """q/k/v from ``magneto_norm(hidden_states)`` fused; o_proj (after BitNet's attn_sub_norm)
    fused with ``magneto_residual``. Without them, the original computation."""

    _modeling = None  # the transformers modeling module (eager attention, rotary embedding)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        magneto_norm: Optional[nn.Module] = None,
        magneto_residual: Optional[Tensor] = None,
        **kwargs,
    ):
        options = _options(self)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = _project(
            hidden_states,
            magneto_norm,
            (self.q_proj, self.k_proj, self.v_proj),
            options,
            concat=False,
        )
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = self._modeling.apply_rotary_pos_emb(
            query_states, key_states, cos, sin
        )
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(
                key_states, value_states, self.layer_idx
            )
        attention_interface = self._modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._modeling.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        out = _output_projection(
            attn_output,
            self.o_proj,
            options,
            norm=getattr(self, "attn_sub_norm", None),
            residual=magneto_residual,
        )
        return out, attn_weights


class _LlamaLikeMLP:
    """gate/up from ``magneto_norm(x)`` fused; down_proj (after BitNet's ffn_sub_norm) with the
    gated activation in its prologue and ``magneto_residual``."""

    def forward(
        self,
        x: Tensor,
        magneto_norm: Optional[nn.Module] = None,
        magneto_residual: Optional[Tensor] = None,
    ) -> Tensor:
        options = _options(self)
        gate_up = _project(x, magneto_norm, (self.gate_proj, self.up_proj), options, concat=True)
        return _output_projection(
            gate_up,
            self.down_proj,
            options,
            norm=getattr(self, "ffn_sub_norm", None),
            act_fn=self.act_fn,
            gated=True,
            residual=magneto_residual,
        )


class _LlamaLikeDecoderLayer:
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
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            magneto_norm=self.input_layernorm,
            magneto_residual=hidden_states,
            **kwargs,
        )
        return self.mlp(
            hidden_states,
            magneto_norm=self.post_attention_layernorm,
            magneto_residual=hidden_states,
        )


def _build_llama_like(modeling, prefix: str) -> dict:
    global _RMS_NORMS
    _RMS_NORMS = _RMS_NORMS + (getattr(modeling, prefix + "RMSNorm"),)
    attention = getattr(modeling, prefix + "Attention")
    attention_cls = type(
        "Magneto" + attention.__name__,
        (_LlamaLikeAttention, attention),
        {"_modeling": modeling, "__module__": __name__},
    )
    mlp = getattr(modeling, prefix + "MLP")
    layer = getattr(modeling, prefix + "DecoderLayer")
    return {
        attention: attention_cls,
        mlp: type("Magneto" + mlp.__name__, (_LlamaLikeMLP, mlp), {"__module__": __name__}),
        layer: type(
            "Magneto" + layer.__name__, (_LlamaLikeDecoderLayer, layer), {"__module__": __name__}
        ),
    }


# ----------------------------------------------------------------------------------------------
# Kosmos-2 and Kosmos-2.5 text decoders: pre-LN blocks, LayerNorm into fc2, dropout after the
# output projections.


def _self_attention_cache(past_key_values):
    if isinstance(past_key_values, EncoderDecoderCache):
        return past_key_values.self_attention_cache
    return past_key_values


class _KosmosAttention:
    """Self-attention: q/k/v from ``magneto_norm(hidden_states)`` fused; out_proj (after
    Kosmos-2's inner_attn_ln) fused with ``magneto_residual`` and ``magneto_dropout_p``.
    Cross-attention runs the original code."""

    _modeling = None
    _scale_query = False  # Kosmos-2.5 scales the query before the attention, not inside it

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
        if encoder_hidden_states is not None:
            return super().forward(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                past_key_values=past_key_values,
                attention_mask=attention_mask,
                **kwargs,
            )
        options = _options(self)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = _project(
            hidden_states,
            magneto_norm,
            (self.q_proj, self.k_proj, self.v_proj),
            options,
            concat=False,
        )
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)
        scaling = self.scaling
        if self._scale_query:
            query_states, scaling = self.scaling * query_states, 1.0
        if past_key_values is not None:
            key_states, value_states = _self_attention_cache(past_key_values).update(
                key_states, value_states, self.layer_idx
            )
        attention_interface = self._modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._modeling.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        out = _output_projection(
            attn_output,
            self.out_proj,
            options,
            norm=getattr(self, "inner_attn_ln", None),
            residual=magneto_residual,
            dropout_p=magneto_dropout_p,
        )
        return out, attn_weights


class _Kosmos2_5Attention(_KosmosAttention):
    """Kosmos-2.5's attention takes attention_mask before past_key_values."""

    _scale_query = True

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


class _KosmosFFN:
    """fc1 from ``magneto_norm(x)`` fused; fc2 with the activation in its prologue, the
    ffn_layernorm, the dropout and ``magneto_residual`` fused. An active activation_dropout sits
    between the activation and ffn_layernorm, where no op can put it: the activation and that
    dropout then run unfused between fc1 and the fused fc2."""

    def forward(
        self,
        hidden_states: Tensor,
        magneto_norm: Optional[nn.Module] = None,
        magneto_residual: Optional[Tensor] = None,
    ) -> Tensor:
        options = _options(self)
        (h,) = _project(hidden_states, magneto_norm, (self.fc1,), options, concat=False)
        act_fn = self.activation_fn
        if self.training and self.activation_dropout > 0.0:
            h = nn.functional.dropout(act_fn(h), p=self.activation_dropout, training=True)
            act_fn = None
        return _output_projection(
            h,
            self.fc2,
            options,
            norm=self.ffn_layernorm,
            act_fn=act_fn,
            residual=magneto_residual,
            dropout_p=self.dropout if self.training else 0.0,
        )


class _Kosmos2TextBlock:
    """Hands the norms, residuals and dropout to the patched self-attention and FFN; the
    cross-attention sub-block runs the original code."""

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
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            magneto_norm=self.self_attn_layer_norm,
            magneto_residual=hidden_states,
            magneto_dropout_p=self.dropout if self.training else 0.0,
            **kwargs,
        )
        if encoder_hidden_states is not None:
            if not hasattr(self, "encoder_attn"):
                raise ValueError(
                    f"If `encoder_hidden_states` are passed, {self} has to be instantiated with"
                    " cross-attention layers by setting `config.add_cross_attention=True`"
                )
            residual = hidden_states
            hidden_states, _ = self.encoder_attn(
                hidden_states=self.encoder_attn_layer_norm(hidden_states),
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                past_key_values=past_key_values,
                output_attentions=output_attentions,
                **kwargs,
            )
            hidden_states = nn.functional.dropout(
                hidden_states, p=self.dropout, training=self.training
            )
            hidden_states = residual + hidden_states
        return self.ffn(
            hidden_states, magneto_norm=self.final_layer_norm, magneto_residual=hidden_states
        )


class _Kosmos2_5TextBlock:
    def forward(
        self,
        hidden_states: Tensor,
        attention_mask=None,
        past_key_values=None,
        use_cache=True,
        **kwargs,
    ) -> Tensor:
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            magneto_norm=self.self_attn_layer_norm,
            magneto_residual=hidden_states,
            magneto_dropout_p=self.dropout if self.training else 0.0,
            **kwargs,
        )
        return self.ffn(
            hidden_states, magneto_norm=self.final_layer_norm, magneto_residual=hidden_states
        )


def _subclass(mixin, original, **attributes):
    return type(
        "Magneto" + original.__name__, (mixin, original), {"__module__": __name__, **attributes}
    )


def _build_kosmos2(modeling) -> dict:
    attention = modeling.KosmosTextAttention
    return {
        attention: _subclass(_KosmosAttention, attention, _modeling=modeling),
        modeling.Kosmos2TextFFN: _subclass(_KosmosFFN, modeling.Kosmos2TextFFN),
        modeling.Kosmos2TextBlock: _subclass(_Kosmos2TextBlock, modeling.Kosmos2TextBlock),
    }


def _build_kosmos2_5(modeling) -> dict:
    attention = modeling.Kosmos2_5TextAttention
    return {
        attention: _subclass(_Kosmos2_5Attention, attention, _modeling=modeling),
        modeling.Kosmos2_5TextFFN: _subclass(_KosmosFFN, modeling.Kosmos2_5TextFFN),
        modeling.Kosmos2_5TextBlock: _subclass(_Kosmos2_5TextBlock, modeling.Kosmos2_5TextBlock),
    }


_BUILDERS = {
    "llama": lambda modeling: _build_llama_like(modeling, "Llama"),
    "bitnet": lambda modeling: _build_llama_like(modeling, "BitNet"),
    "kosmos2": _build_kosmos2,
    "kosmos2_5": _build_kosmos2_5,
}


@functools.lru_cache(maxsize=None)
def replacements(family: str) -> dict:
    """The family's ``{transformers class: replacement class}``, built once (before any class
    patching, so the keys are transformers' own classes)."""
    table = _BUILDERS[family](importlib.import_module(_MODELING[family]))
    for replacement in table.values():  # reachable by name, so that patched models pickle
        globals()[replacement.__name__] = replacement
    return table


# ----------------------------------------------------------------------------------------------
# Patching.


def _family_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"apply_magneto supports the model types {tuple(MODEL_TYPES)}, got {model_type!r}"
            f" ({type(model).__name__})"
        )
    return MODEL_TYPES[model_type]


def _projections(module: nn.Module):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")
    names += ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")
    return [(name, getattr(module, name)) for name in names if hasattr(module, name)]


def apply_magneto(model: nn.Module, **options) -> nn.Module:
    """Patch ``model`` (a Llama, BitNet, Kosmos-2 or Kosmos-2.5 model of transformers, or a
    wrapper such as a PEFT model) in place to run magneto's fused ops, and return it.

    ``options``: the fields of ``MagnetoOptions``. Dispatches on ``model.config.model_type``
    (``MODEL_TYPES``); ValueError for another. For Kosmos-2 and Kosmos-2.5 the text decoder is
    patched and the vision tower left alone. What is fused and what is not: the module
    docstring. Patching twice is a no-op (a second call only sets the options).
    """
    table = replacements(_family_of(model))
    settings = MagnetoOptions(**options)
    patched = set(table.values())
    unfused = []
    for name, module in model.named_modules():
        if type(module) in table:
            module.__class__ = table[type(module)]
        if type(module) in patched:
            module._magneto_options = settings
            unfused += [
                f"{name}.{proj} ({type(linear).__name__})"
                for proj, linear in _projections(module)
                if type(linear) is not nn.Linear
            ]
    if unfused:
        logger.warning(
            "magneto: these projections are not plain nn.Linear and run unfused: %s",
            ", ".join(unfused),
        )
    return model


def _patch_classes(family: str, options: dict) -> None:
    modeling = importlib.import_module(_MODELING[family])
    settings = MagnetoOptions(**options)
    for original, replacement in replacements(family).items():
        replacement._magneto_options = settings
        setattr(modeling, original.__name__, replacement)


def apply_magneto_to_llama(**options) -> None:
    """Patch transformers' Llama classes, so that models built afterwards (``from_pretrained``
    included) run magneto's fused ops. ``options``: the fields of ``MagnetoOptions``."""
    _patch_classes("llama", options)


def apply_magneto_to_bitnet(**options) -> None:
    """``apply_magneto_to_llama`` for BitNet (quantised ``AutoBitLinear`` weights run unfused)."""
    _patch_classes("bitnet", options)


def apply_magneto_to_kosmos2(**options) -> None:
    """``apply_magneto_to_llama`` for Kosmos-2's text decoder (the vision tower is left alone)."""
    _patch_classes("kosmos2", options)


def apply_magneto_to_kosmos2_5(**options) -> None:
    """``apply_magneto_to_llama`` for Kosmos-2.5's text decoder (the vision tower is left
    alone)."""
    _patch_classes("kosmos2_5", options)


__all__ = [
    "MODEL_TYPES",
    "MagnetoOptions",
    "apply_magneto",
    "apply_magneto_to_llama",
    "apply_magneto_to_bitnet",
    "apply_magneto_to_kosmos2",
    "apply_magneto_to_kosmos2_5",
    "replacements",
]
