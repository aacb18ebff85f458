"""One configuration for encoder-only, decoder-only and encoder-decoder Magneto models.

``MagnetoConfig`` holds what torchscale spreads over ``EncoderConfig``, ``DecoderConfig`` and
``EncoderDecoderConfig`` (``magneto.compat.torchscale`` converts between them). The norm scheme
decides where the LayerNorms sit and how the residuals add:

=========== ========================================================= ==============
scheme      one sublayer f (attention or FFN)                          residual alpha
=========== ========================================================= ==============
subln       ``x + W_out · LN_inner(f_core(LN_in(x)))`` (Magneto)       1
pre         ``x + W_out · f_core(LN_in(x))`` (Pre-LN)                  1
post        ``LN(x + W_out · f_core(x))`` (Post-LN)                    1
deepnorm    ``LN(alpha·x + W_out · f_core(x))`` (DeepNet)              DeepNorm alpha
=========== ========================================================= ==============

(cross-attention never has an inner LN). Every field is checked in ``__post_init__``; a bad
value raises ``ValueError`` naming the field and what was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

from magneto.moe_gate import POLICIES
from magneto.norm import NORMS
from magneto.relative_position import check_buckets
from magneto_kernels.backends import BACKENDS
from magneto_kernels.codes import canonical_activation

NORM_SCHEMES = ("subln", "pre", "post", "deepnorm")
INITS = ("paper", "torchscale")
POSITIONS = ("learned", "sinusoidal", "none")
DEEPNORM_BETAS = ("paper", "torchscale")


@dataclass
class MagnetoConfig:
    """Hyper-parameters of a Magneto model (all sizes in elements).

    Model shape: ``embed_dim`` (d), ``num_heads``, ``ffn_dim``, ``encoder_layers`` (N),
    ``decoder_layers`` (M). An encoder-only model uses N, a decoder-only one M, an
    encoder-decoder both (its init depends on both).

    Vocabulary: with ``vocab_size > 0`` an Encoder/Decoder builds its own token embedding (unless
    one is passed in) and an output projection (``output_projection=True``; the encoder of an
    encoder-decoder has none). ``positions`` picks learned (torchscale/fairseq layout: position
    ids start at 2), sinusoidal or no position embeddings, up to ``max_positions`` tokens.

    Regularisation (active in training only): ``dropout`` on every sublayer output and on the
    embeddings, ``attention_dropout`` on the attention probabilities, ``activation_dropout``
    after the FFN activation, ``drop_path`` the largest stochastic-depth rate (layer i of L gets
    ``drop_path·i/(L-1)``, as torchscale).

    ``activation``: a name the ops know (``magneto_kernels.codes.ACTIVATIONS`` and their
    aliases; fused into fc2's prologue) or any callable, a function or an ``nn.Module`` (applied
    unfused between fc1 and fc2, the rest stays fused).

    ``norm_scheme``: see the module docstring. ``norm``: "layer" (LayerNorm) or "rms" (RMSNorm).
    ``init``: "paper" (Xavier normal with the paper's gains, zero biases; the default) or
    "torchscale" (``nn.Linear``'s default init times the same gains, weights and biases, drawn in
    torchscale's order: the same seed gives the same model). ``deepnorm_beta`` picks the
    encoder beta of a DeepNorm encoder-decoder: "paper" (0.87·(N⁴M)^(-1/16)) or "torchscale"
    (1.15·(N⁴M)^(-1/16)); None follows ``init``.

    ``multiway``: every per-token module of an encoder layer comes in two copies, ``A`` and
    ``B``, chosen per token by ``multiway_split_position`` (BEiT-3; ``magneto.multiway``). In a
    decoder, as in torchscale, only the attention projections (and ``inner_attn_ln``) come in
    two copies, and copy A serves every token (torchscale's decoder never sets a split).

    torchscale's options, under torchscale's names:

    - ``layernorm_embedding``: a norm (``norm``'s kind) on the embeddings, after the positions
      and before the embedding dropout (``magneto.embedding_norm``);
    - ``rel_pos_buckets``, ``max_rel_pos`` (both > 0, or both 0 for none): T5's relative position
      buckets, a learned bias per head and bucket added to the attention scores; tables on the
      encoder (``relative_position``) and decoder (``self_attn_relative_position``, and
      ``cross_attn_relative_position`` in an encoder-decoder) (``magneto.relative_position``);
    - ``xpos_rel_pos``, ``xpos_scale_base``: xPos rotary positions on self-attention's queries
      and keys (``magneto.xpos``; head_dim must be even);
    - ``moe_freq``, ``moe_expert_count``: every ``moe_freq``-th layer (layer i with
      (i+1) % moe_freq == 0) has a mixture of ``moe_expert_count`` experts, ``FeedForward``s, in
      place of its FFN (``magneto.moe``; a layer returns its ``l_aux``); ``moe_top1_expert`` (top-1
      gating, else top-2), ``moe_gating_use_fp32``, ``moe_eval_capacity_token_fraction``,
      ``moe_second_expert_policy`` ("sampling", "random", "all"),
      ``moe_normalize_gate_prob_before_dropping`` and ``use_xmoe`` (X-MoE routing) as in
      ``magneto.moe_gate``. ``use_xmoe`` forces ``moe_normalize_gate_prob_before_dropping=True``
      and ``moe_second_expert_policy="random"``, as torchscale's configs do. Under
      ``torch.distributed`` with several ranks the experts are spread over the ranks as
      torchscale spreads them (``magneto.moe.expert_group``).

    ``backend`` is passed to every ``magneto_kernels`` op (None: the default for the device).
    ``checkpoint_activations`` recomputes each layer in backward (non-reentrant checkpoint).
    ``residual_in_fp32``: in a post / deepnorm block of a bf16/fp16 model, each residual sum
    ``alpha·x + f(x)`` is formed and kept (for the norm's backward) in float32, the norm's output
    in the model's dtype (``add_layer_norm(..., residual_in_fp32=True)``).
    """

    embed_dim: int = 768
    num_heads: int = 12
    ffn_dim: int = 3072
    encoder_layers: int = 12
    decoder_layers: int = 12
    vocab_size: int = 0
    padding_idx: Optional[int] = None
    max_positions: int = 1024
    positions: str = "learned"
    scale_embedding: bool = False
    share_input_output_embed: bool = False
    share_all_embeddings: bool = False
    output_projection: bool = True
    normalize_output: bool = True
    activation: Union[str, Callable] = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    drop_path: float = 0.0
    eps: float = 1e-5
    norm: str = "layer"
    norm_scheme: str = "subln"
    init: str = "paper"
    deepnorm_beta: Optional[str] = None
    bias: bool = True
    backend: Optional[str] = None
    checkpoint_activations: bool = False
    residual_in_fp32: bool = False
    multiway: bool = False
    layernorm_embedding: bool = False
    rel_pos_buckets: int = 0
    max_rel_pos: int = 0
    xpos_rel_pos: bool = False
    xpos_scale_base: float = 512
    moe_freq: int = 0
    moe_expert_count: int = 0
    moe_top1_expert: bool = False
    moe_gating_use_fp32: bool = True
    moe_eval_capacity_token_fraction: float = 0.25
    moe_second_expert_policy: str = "random"
    moe_normalize_gate_prob_before_dropping: bool = False
    use_xmoe: bool = False

    def __post_init__(self):
        for name in ("embed_dim", "num_heads", "ffn_dim", "max_positions"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in (
            "encoder_layers",
            "decoder_layers",
            "vocab_size",
            "rel_pos_buckets",
            "max_rel_pos",
            "moe_freq",
            "moe_expert_count",
        ):
            _check_int(name, getattr(self, name), minimum=0)
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim="
                f"{self.embed_dim} and num_heads={self.num_heads}"
            )
        if self.padding_idx is not None:
            _check_int("padding_idx", self.padding_idx, minimum=0)
            if self.vocab_size and self.padding_idx >= self.vocab_size:
                raise ValueError(
                    f"padding_idx must be < vocab_size={self.vocab_size}, got {self.padding_idx}"
                )
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_scheme", self.norm_scheme, NORM_SCHEMES)
        _check_choice("init", self.init, INITS)
        if self.deepnorm_beta is not None:
            _check_choice("deepnorm_beta", self.deepnorm_beta, DEEPNORM_BETAS)
        if self.backend is not None:
            _check_choice("backend", self.backend, BACKENDS)
        if not callable(self.activation):
            canonical_activation(self.activation)  # the ops' activations and aliases
        for name in ("dropout", "attention_dropout", "activation_dropout", "drop_path"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0.0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        for name in (
            "scale_embedding",
            "share_input_output_embed",
            "share_all_embeddings",
            "output_projection",
            "normalize_output",
            "bias",
            "checkpoint_activations",
            "residual_in_fp32",
            "multiway",
            "layernorm_embedding",
            "xpos_rel_pos",
            "moe_top1_expert",
            "moe_gating_use_fp32",
            "moe_normalize_gate_prob_before_dropping",
            "use_xmoe",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._check_positions()
        self._check_moe()
        if (self.share_input_output_embed or self.share_all_embeddings) and self.vocab_size == 0:
            raise ValueError("share_input_output_embed / share_all_embeddings need vocab_size > 0")

    def _check_positions(self) -> None:
        if (self.rel_pos_buckets > 0) != (self.max_rel_pos > 0):
            raise ValueError(
                f"rel_pos_buckets={self.rel_pos_buckets}, max_rel_pos={self.max_rel_pos}: "
                "both > 0 turn relative position buckets on, both 0 leave them off"
            )
        if self.rel_pos_buckets > 0:
            try:
                check_buckets(self.rel_pos_buckets, self.max_rel_pos, bidirectional=True)
            except ValueError as err:
                raise ValueError(f"rel_pos_buckets / max_rel_pos: {err}") from None
        base = self.xpos_scale_base
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
            raise ValueError(f"xpos_scale_base must be a positive number, got {base!r}")
        if self.xpos_rel_pos and self.head_dim % 2:
            raise ValueError(
                f"xpos_rel_pos: xPos rotates pairs, head_dim = embed_dim / num_heads must be "
                f"even, got {self.head_dim}"
            )

    def _check_moe(self) -> None:
        _check_choice("moe_second_expert_policy", self.moe_second_expert_policy, POLICIES)
        fraction = self.moe_eval_capacity_token_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(
                f"moe_eval_capacity_token_fraction must be a number (<= 0: the training "
                f"capacity in eval mode too), got {fraction!r}"
            )
        if self.use_xmoe:
            if not (self.moe_freq > 0 and self.moe_expert_count > 0):
                raise ValueError(
                    "use_xmoe needs mixture-of-experts layers: moe_freq and moe_expert_count > 0"
                )
            # torchscale's configs force these two with X-MoE
            self.moe_normalize_gate_prob_before_dropping = True
            self.moe_second_expert_policy = "random"
        top = 1 if self.moe_top1_expert else 2
        if self.moe_freq > 0 and self.moe_expert_count < top:
            raise ValueError(
                f"moe_expert_count must be >= {top} for top-{top} gating when moe_freq > 0, got "
                f"{self.moe_expert_count}"
            )

    def is_moe_layer(self, depth: int) -> bool:
        """Whether layer ``depth`` (from 0) of a stack is a mixture-of-experts layer."""
        return self.moe_freq > 0 and (depth + 1) % self.moe_freq == 0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def canonical_activation(self) -> Union[str, Callable]:
        """The activation in ``magneto_kernels`` spelling ("swish" -> "silu"), or the callable."""
        if callable(self.activation):
            return self.activation
        return canonical_activation(self.activation)

    @property
    def normalize_before(self) -> bool:
        """True when sublayers normalise their input (Sub-LN, Pre-LN), not for Post-LN/DeepNorm."""
        return self.norm_scheme in ("subln", "pre")

    def replace(self, **changes) -> "MagnetoConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def encoder_only_config(
    embed_dim: int, num_heads: int, ffn_dim: int, layers: int, fields: dict
) -> MagnetoConfig:
    """An encoder fed embeddings its owner computes (``VisionTransformer``'s patches,
    ``SpeechEncoder``'s frames): no vocabulary, no decoder, GELU, then ``fields``."""
    return MagnetoConfig(
        **{
            "embed_dim": embed_dim,
            "num_heads": num_heads,
            "ffn_dim": ffn_dim,
            "encoder_layers": layers,
            "decoder_layers": 0,
            "vocab_size": 0,
            "activation": "gelu",
            **fields,
        }
    )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
