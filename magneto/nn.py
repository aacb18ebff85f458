"""Drop-in replacements for ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
with a Magneto (Sub-LN) block inside, and ``magnetize`` to swap the layers of an existing
``torch.nn.TransformerEncoder`` / ``TransformerDecoder`` / ``Transformer``.

Same constructor arguments and forward calls as ``torch.nn`` (``d_model, nhead,
dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias, device,
dtype``), so the layers work inside ``torch.nn.TransformerEncoder`` / ``TransformerDecoder``.
Masks read as ``torch.nn`` reads them (``magneto.masks``): bool with True = not allowed, or
float added to the scores (finite values included, for the key padding masks too), 2-D or
per head (batch·heads, tgt, src); integer masks are refused, as ``torch.nn`` refuses them.
The ``is_causal`` hints: with a mask the mask decides (torch.nn may use a causal kernel
instead, which gives the same result when the hint is true); ``is_causal`` / ``tgt_is_causal``
without a mask apply the causal mask (torch.nn raises there, or its fast path ignores the
hint); ``memory_is_causal`` without ``memory_mask`` raises, as torch.nn does.
Unbatched inputs, (length, d_model) with (length,) key padding masks, work as in ``torch.nn``.
``activation``: a name the fused ops know, torch's relu / gelu / silu (functions or modules),
or any other callable, which then runs unfused between fc1 and fc2.

What differs from ``torch.nn`` (by design):

- The block is Magneto's Sub-LN: ``x + W_O·LN(attn(LN(x)))`` and
  ``x + W_2·LN(act(W_1·LN(x)))``. It has two more LayerNorms than a Pre-LN layer
  (``self_attn.inner_attn_ln``, ``ffn.ffn_layernorm``), so pretrained ``torch.nn`` weights do not
  carry over bit-for-bit: ``magnetize(..., copy_weights=True)`` copies every weight that has a
  counterpart and starts the new LayerNorms at identity, but the function still changes.
  ``norm_first`` is accepted for signature compatibility and ignored (Magneto always
  normalises first); ``norm_scheme="pre" | "post" | "deepnorm"`` picks another block.
- Magneto's init scales fc1, fc2, v_proj and out_proj by a gain that depends on the depth:
  pass ``num_layers`` (and, for decoder layers, ``num_encoder_layers``) to get the gains of the
  stack the layer goes into; ``magnetize`` does this for you.
- ``dropout`` applies where ``torch.nn`` applies it (attention probabilities, the FFN activation,
  both sublayer outputs). Activation dropout makes fc2 take the unfused path
  (``magneto.FeedForward``); pass ``activation_dropout=0.0`` to keep it fused.
- Parameter names are Magneto's (torchscale's), not ``torch.nn``'s.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magneto.config import MagnetoConfig
from magneto.layers import DecoderLayer, EncoderLayer
from magneto.masks import torch_mask

_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu"}
"""torch's activation functions the fused ops have, by their ops name."""


def _activation(activation: Union[str, Callable]) -> Union[str, Callable]:
    """The ops' name for ``activation`` where they have it (fused), else the callable itself
    (applied unfused; ``MagnetoConfig.activation``)."""
    if not isinstance(activation, str) and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]
    for module_type, name in ((nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.SiLU, "silu")):
        if type(activation) is module_type:
            tanh = name == "gelu" and activation.approximate == "tanh"
            return "gelu_tanh" if tanh else name
    return activation


def _config(
    d_model,
    nhead,
    dim_feedforward,
    dropout,
    activation,
    layer_norm_eps,
    bias,
    encoder_layers,
    decoder_layers,
    options,
) -> MagnetoConfig:
    attention_dropout = options.pop("attention_dropout", None)
    activation_dropout = options.pop("activation_dropout", None)
    return MagnetoConfig(
        embed_dim=d_model,
        num_heads=nhead,
        ffn_dim=dim_feedforward,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        dropout=dropout,
        attention_dropout=dropout if attention_dropout is None else attention_dropout,
        activation_dropout=dropout if activation_dropout is None else activation_dropout,
        activation=_activation(activation),
        eps=layer_norm_eps,
        bias=bias,
        positions="none",
        **options,
    )


def _to_batch_first(x: Tensor, batch_first: bool, name: str, dim: int) -> Tensor:
    """x as (batch, length, d): transposed unless ``batch_first``; an unbatched (length, d)
    input (torch.nn takes it) as a batch of one."""
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be a 3-D Tensor, or 2-D unbatched, got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension d_model={dim}, got {tuple(x.shape)}")
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def _from_batch_first(y: Tensor, like: Tensor, batch_first: bool) -> Tensor:
    """The layer's output in the layout of its input ``like``."""
    if like.dim() == 2:
        return y.squeeze(0)
    return y if batch_first else y.transpose(0, 1)


def _padding(mask: Optional[Tensor], like: Tensor, name: str) -> Optional[Tensor]:
    """A key padding mask as torch.nn takes it, (length,) for an unbatched input."""
    mask = torch_mask(mask, name)
    return mask.unsqueeze(0) if mask is not None and like.dim() == 2 else mask


class TransformerEncoderLayer(EncoderLayer):
    """``torch.nn.TransformerEncoderLayer``'s interface around a Magneto encoder layer.

    Extra keyword arguments: ``num_layers`` (depth of the stack, for the init gains),
    ``attention_dropout`` / ``activation_dropout`` (default: ``dropout``) and any
    ``MagnetoConfig`` field (``norm_scheme``, ``norm``, ``init``, ``backend``, ...).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_layers: int = 1,
        **options,
    ):
        config = _config(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            bias,
            num_layers,
            0,
            options,
        )
        super().__init__(config)
        self.batch_first = batch_first
        self.self_attn.batch_first = batch_first  # torch.nn.TransformerEncoder reads this
        self.to(device=device, dtype=dtype)

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = _to_batch_first(src, self.batch_first, "src", self.embed_dim)
        x = self.residual(
            x,
            self.self_attn_layer_norm,
            self.self_attn,
            key_padding_mask=_padding(src_key_padding_mask, src, "src_key_padding_mask"),
            attn_mask=torch_mask(src_mask, "src_mask"),
            is_causal=is_causal and src_mask is None,
        )
        x = self.residual(x, self.final_layer_norm, self.ffn)
        return _from_batch_first(x, src, self.batch_first)


class TransformerDecoderLayer(DecoderLayer):
    """``torch.nn.TransformerDecoderLayer``'s interface around a Magneto decoder layer
    (self-attention, cross-attention on ``memory``, feed-forward).

    Extra keyword arguments: ``num_layers`` (decoder depth M), ``num_encoder_layers`` (N; the
    init gains of an encoder-decoder depend on both), and as ``TransformerEncoderLayer``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_layers: int = 1,
        num_encoder_layers: int = 1,
        **options,
    ):
        config = _config(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            bias,
            num_encoder_layers,
            num_layers,
            options,
        )
        super().__init__(config, is_encoder_decoder=True)
        self.batch_first = batch_first
        self.self_attn.batch_first = batch_first
        self.to(device=device, dtype=dtype)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = _to_batch_first(tgt, self.batch_first, "tgt", self.embed_dim)
        mem = _to_batch_first(memory, self.batch_first, "memory", self.embed_dim)
        if memory_is_causal and memory_mask is None:
            raise ValueError(
                "memory_is_causal=True needs memory_mask: the hint says memory_mask is causal "
                "(as torch.nn, which raises too)"
            )
        x = self.residual(
            x,
            self.self_attn_layer_norm,
            self.self_attn,
            key_padding_mask=_padding(tgt_key_padding_mask, tgt, "tgt_key_padding_mask"),
            attn_mask=torch_mask(tgt_mask, "tgt_mask"),
            is_causal=tgt_is_causal and tgt_mask is None,
        )
        x = self.residual(
            x,
            self.encoder_attn_layer_norm,
            self.encoder_attn,
            key=mem,
            value=mem,
            key_padding_mask=_padding(memory_key_padding_mask, memory, "memory_key_padding_mask"),
            attn_mask=torch_mask(memory_mask, "memory_mask"),
        )
        x = self.residual(x, self.final_layer_norm, self.ffn)
        return _from_batch_first(x, tgt, self.batch_first)


def _layer_arguments(old: nn.Module) -> dict:
    linear1 = old.linear1
    return dict(
        d_model=old.self_attn.embed_dim,
        nhead=old.self_attn.num_heads,
        dim_feedforward=linear1.out_features,
        dropout=old.dropout.p,
        activation=old.activation,
        layer_norm_eps=old.norm1.eps,
        batch_first=old.self_attn.batch_first,
        bias=linear1.bias is not None,
        device=linear1.weight.device,
        dtype=linear1.weight.dtype,
    )


@torch.no_grad()
def _copy_weights(new: nn.Module, old: nn.Module) -> None:
    """Every torch.nn weight that has a Magneto counterpart; new LayerNorms stay at identity."""
    pairs = [
        (new.self_attn, old.self_attn),
        (new.self_attn_layer_norm, old.norm1),
        (new.ffn.fc1, old.linear1),
        (new.ffn.fc2, old.linear2),
    ]
    if isinstance(old, nn.TransformerDecoderLayer):
        pairs += [
            (new.encoder_attn, old.multihead_attn),
            (new.encoder_attn_layer_norm, old.norm2),
            (new.final_layer_norm, old.norm3),
        ]
    else:
        pairs.append((new.final_layer_norm, old.norm2))
    for target, source in pairs:
        if isinstance(source, nn.MultiheadAttention):
            if not source._qkv_same_embed_dim:
                raise ValueError(
                    "copy_weights: attention with kdim/vdim != d_model is not supported"
                )
            target.in_proj_weight.copy_(source.in_proj_weight)
            if target.in_proj_bias is not None:
                target.in_proj_bias.copy_(source.in_proj_bias)
            target, source = target.out_proj, source.out_proj
        target.weight.copy_(source.weight)
        if getattr(target, "bias", None) is not None and source.bias is not None:
            target.bias.copy_(source.bias)


def _magnetize_stack(
    stack: nn.Module, layer_type, torch_type, extra: dict, copy_weights: bool, options: dict
) -> None:
    layers = stack.layers
    for i, old in enumerate(layers):
        if not isinstance(old, torch_type):
            raise ValueError(
                f"layers[{i}] must be a torch.nn.{torch_type.__name__}, got {type(old).__name__}"
            )
        new = layer_type(**_layer_arguments(old), num_layers=len(layers), **extra, **options)
        if copy_weights:
            _copy_weights(new, old)
        new.train(old.training)
        layers[i] = new
    if hasattr(stack, "use_nested_tensor"):
        stack.use_nested_tensor = False  # torch's nested-tensor fast path needs its own layers


def magnetize(module: nn.Module, *, copy_weights: bool = False, **options) -> nn.Module:
    """Swap, in place, the layers of a ``torch.nn.TransformerEncoder``, ``TransformerDecoder`` or
    ``Transformer`` for Magneto layers of the same shape; returns ``module``.

    The new layers get Magneto's init for the stack's depth (decoder layers of an
    ``nn.Transformer`` also for its encoder depth). ``copy_weights=True`` copies every weight
    with a counterpart instead (see the module docstring for what still changes). ``options``:
    ``MagnetoConfig`` fields for every new layer (``backend``, ``norm_scheme``, ...).
    """
    if isinstance(module, nn.Transformer):
        _magnetize_stack(
            module.encoder,
            TransformerEncoderLayer,
            nn.TransformerEncoderLayer,
            {},
            copy_weights,
            options,
        )
        _magnetize_stack(
            module.decoder,
            TransformerDecoderLayer,
            nn.TransformerDecoderLayer,
            {"num_encoder_layers": len(module.encoder.layers)},
            copy_weights,
            options,
        )
    elif isinstance(module, nn.TransformerEncoder):
        _magnetize_stack(
            module, TransformerEncoderLayer, nn.TransformerEncoderLayer, {}, copy_weights, options
        )
    elif isinstance(module, nn.TransformerDecoder):
        _magnetize_stack(
            module,
            TransformerDecoderLayer,
            nn.TransformerDecoderLayer,
            {"num_encoder_layers": options.pop("num_encoder_layers", 1)},
            copy_weights,
            options,
        )
    else:
        raise ValueError(
            f"module must be a torch.nn.TransformerEncoder, TransformerDecoder or "
            f"Transformer, got {type(module).__name__}"
        )
    return module
