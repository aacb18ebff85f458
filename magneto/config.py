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

from magneto.norm import NORMS
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
    ``B``, chosen per token by ``multiway_split_position`` (BEiT-3; ``magneto.multiway``).

    ``backend`` is passed to every ``magneto_kernels`` op (None: the default for the device).
    ``checkpoint_activations`` recomputes each layer in backward (non-reentrant checkpoint).
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
    multiway: bool = False

    def __post_init__(self):
        for name in ("embed_dim", "num_heads", "ffn_dim", "max_positions"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("encoder_layers", "decoder_layers", "vocab_size"):
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
            "multiway",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if (self.share_input_output_embed or self.share_all_embeddings) and self.vocab_size == 0:
            raise ValueError("share_input_output_embed / share_all_embeddings need vocab_size > 0")

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


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
