"""Conversion between torchscale 0.3.0 modules and magneto modules.

``from_torchscale(module)`` turns a torchscale ``Encoder``, ``Decoder`` or ``EncoderDecoder``
(Sub-LN, Pre-LN, Post-LN or DeepNorm), or a ``torchscale.model.BEiT3.BEiT3`` (multiway), into
the equivalent magneto module, a drop-in replacement: same forward call, same result
structure, same outputs and gradients (up to float rounding), ``incremental_state`` decoding
included. Every option of torchscale's configs converts (``MagnetoConfig`` has them under
their names): ``layernorm_embedding``, relative position buckets (``rel_pos_buckets``,
``max_rel_pos``), xPos (``xpos_rel_pos``, ``xpos_scale_base``), mixture-of-experts layers
(``moe_freq``, ``moe_expert_count``, ``moe_top1_expert``, ``moe_gating_use_fp32``,
``moe_eval_capacity_token_fraction``, ``moe_second_expert_policy``,
``moe_normalize_gate_prob_before_dropping``, ``use_xmoe``; a layer's experts are this rank's
under ``torch.distributed``, as torchscale places them), ``multiway`` (encoders, decoders,
encoder-decoders and BEiT3), ``checkpoint_activations``, ``drop_path_rate``, ``bert_init``
(an init only: the weights are copied), and ``fsdp`` when it wrapped nothing (outside
fairscale's ``enable_wrap`` it wraps no layer). Parameter names are torchscale's except that
q/k/v are stored packed (``in_proj.weight``/``in_proj.bias``; multiway ``in_proj.A.weight``
...); magneto modules load torchscale state dicts directly (xPos's constant ``xpos.scale``
buffers are checked and dropped), and ``to_torchscale(module)`` / ``to_torchscale_state_dict``
export back.

Refused with a ``ValueError`` naming what it is, never converted approximately: a model whose
layers are wrapped for sharded data parallelism (fairscale's or torch's FSDP:
``magneto.compat.wrapping``; unwrap it, or convert before wrapping), an encoder-decoder whose
encoder and decoder differ in width, heads, FFN width or norm placement, an activation other
than gelu, relu and swish. Embedding modules of types magneto does not know are carried over
unchanged (deep-copied). torchscale's MoE layers need ``torch.distributed`` initialised (one
process is enough), and so does ``to_torchscale`` of an MoE model.

Importing torchscale needs ``timm.models.layers.drop_path``; where timm is not installed, the
labelled stand-in ``magneto.compat.timm_standin`` provides it (``use_if_missing()``).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from magneto.beit3 import BEiT3
from magneto.compat.wrapping import wrapped_layers
from magneto.config import MagnetoConfig
from magneto.decoder import Decoder
from magneto.embeddings import LearnedPositionalEmbedding, TokenEmbedding
from magneto.encoder import Encoder
from magneto.encoder_decoder import EncoderDecoder
from magneto.moe_gate import POLICIES
from magneto.multiway import PARTS
from magneto.xpos import xpos_scale

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "swish": "silu"}
# torchscale's options MagnetoConfig holds under the same name and meaning
_OPTIONS = (
    "layernorm_embedding",
    "xpos_rel_pos",
    "xpos_scale_base",
    "moe_freq",
    "moe_expert_count",
    "moe_top1_expert",
    "moe_gating_use_fp32",
    "moe_eval_capacity_token_fraction",
    "moe_normalize_gate_prob_before_dropping",
    "use_xmoe",
)


def _torchscale():
    """torchscale's architecture modules (imported on demand)."""
    try:
        from torchscale.architecture import config, decoder, encoder, encoder_decoder
        from torchscale.component import embedding
    except ImportError as err:
        raise ImportError(
            f"torchscale 0.3.0 is needed here ({err}). It installs with `pip install "
            "fairscale==0.4.0 && pip install --no-deps torchscale==0.3.0`; it imports "
            "timm.models.layers.drop_path: where timm is not installed, call "
            "magneto.compat.timm_standin.use_if_missing() first (a labelled stand-in)"
        ) from err
    return config, encoder, decoder, encoder_decoder, embedding


# ------------------------------------------------------------------------------------------
# torchscale -> magneto


def _beit3_class():
    """torchscale's BEiT3 (imported on demand, after ``_torchscale()`` succeeded)."""
    from torchscale.model.BEiT3 import BEiT3 as TSBEiT3

    return TSBEiT3


def config_from_torchscale(args, kind: str) -> MagnetoConfig:
    """A ``MagnetoConfig`` equal to torchscale ``args`` for a model of ``kind`` ("encoder",
    "decoder", "encoder_decoder" or "beit3"); ValueError naming the first option it cannot
    represent."""
    if kind == "beit3" and not getattr(args, "multiway", False):
        raise ValueError("multiway=False: a BEiT3 model is multiway")
    sides = {
        "encoder": ["encoder"],
        "decoder": ["decoder"],
        "beit3": ["encoder"],
        "encoder_decoder": ["encoder", "decoder"],
    }[kind]
    first = sides[0]
    for field in ("embed_dim", "attention_heads", "ffn_embed_dim", "normalize_before"):
        values = {getattr(args, f"{side}_{field}") for side in sides}
        if len(values) > 1:
            raise ValueError(
                f"decoder_{field}={getattr(args, f'decoder_{field}')!r} differs from "
                f"encoder_{field}: magneto uses one value for both"
            )
    activation = str(args.activation_fn)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation_fn={activation!r}: expected one of {tuple(_ACTIVATIONS)}")
    if args.deepnorm:
        scheme = "deepnorm"
    elif args.subln:
        scheme = "subln"
    else:
        scheme = "pre" if getattr(args, f"{first}_normalize_before") else "post"
    max_positions = int(
        getattr(
            args, "max_source_positions" if first == "encoder" else "max_target_positions", 1024
        )
    )
    if kind == "beit3":  # BEiT3's text table has max_source_positions rows, 2 of them unused
        max_positions -= LearnedPositionalEmbedding.OFFSET
        if max_positions < 1:
            raise ValueError(f"max_source_positions={args.max_source_positions}: BEiT3 needs > 2")
    return MagnetoConfig(
        embed_dim=getattr(args, f"{first}_embed_dim"),
        num_heads=getattr(args, f"{first}_attention_heads"),
        ffn_dim=getattr(args, f"{first}_ffn_embed_dim"),
        encoder_layers=getattr(args, "encoder_layers", 0) if kind != "decoder" else 0,
        decoder_layers=getattr(args, "decoder_layers", 0) if kind != "encoder" else 0,
        vocab_size=max(int(args.vocab_size), 0),
        max_positions=max_positions,
        positions="learned" if kind == "beit3" else "none",
        scale_embedding=not args.no_scale_embedding,
        output_projection=not args.no_output_layer,
        normalize_output=bool(getattr(args, "normalize_output", True)),
        activation=_ACTIVATIONS[activation],
        dropout=float(args.dropout),
        attention_dropout=float(args.attention_dropout),
        activation_dropout=float(args.activation_dropout),
        drop_path=float(args.drop_path_rate),
        eps=float(args.layernorm_eps),
        norm="layer",
        norm_scheme=scheme,
        init="torchscale",
        checkpoint_activations=bool(args.checkpoint_activations),
        multiway=bool(getattr(args, "multiway", False)),
        **_options_from_torchscale(args),
    )


def _options_from_torchscale(args) -> dict:
    """The ``MagnetoConfig`` fields of torchscale's position, embedding-norm and MoE options."""
    options = {name: getattr(args, name) for name in _OPTIONS if hasattr(args, name)}
    buckets, distance = getattr(args, "rel_pos_buckets", 0), getattr(args, "max_rel_pos", 0)
    if buckets > 0 and distance > 0:  # torchscale's condition; anything else is off
        options.update(rel_pos_buckets=buckets, max_rel_pos=distance)
    policy = getattr(args, "moe_second_expert_policy", "random")
    # torchscale's gating treats any policy but "sampling" and "random" as keeping both choices
    options["moe_second_expert_policy"] = policy if policy in POLICIES else "all"
    return options


def _embedding_from_torchscale(module: Optional[nn.Module], embedding_mod, memo: dict):
    if module is None:
        return None
    if id(module) in memo:  # shared between encoder and decoder
        return memo[id(module)]
    known = (nn.Embedding, embedding_mod.TextEmbedding, embedding_mod.PositionalEmbedding)
    plain = (
        type(module) in known
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )
    if plain:
        cls = (
            LearnedPositionalEmbedding
            if isinstance(module, embedding_mod.PositionalEmbedding)
            else TokenEmbedding
        )
        converted = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
    else:
        converted = copy.deepcopy(module)
    memo[id(module)] = converted
    return converted


def _embeds(module) -> tuple:
    """An encoder-decoder's four embeddings (torchscale's or magneto's) in the order both
    constructors take them: encoder tokens and positions, decoder tokens and positions."""
    enc, dec = module.encoder, module.decoder
    return enc.embed_tokens, enc.embed_positions, dec.embed_tokens, dec.embed_positions


def _copy_projection(projection, embed_tokens, converted_tokens):
    if projection is None:
        return None
    if type(projection) is not nn.Linear:
        return copy.deepcopy(projection)
    converted = nn.Linear(
        projection.in_features, projection.out_features, bias=projection.bias is not None
    )
    if embed_tokens is not None and projection.weight is getattr(embed_tokens, "weight", None):
        converted.weight = converted_tokens.weight
    return converted


def _detach_unowned(target: nn.Module, source: nn.Module) -> None:
    """Drop what magneto built from its config but the torchscale module does not have."""
    for name in ("embed_tokens", "embed_positions", "output_projection"):
        if getattr(source, name, None) is None:
            setattr(target, name, None)


def _check_alphas(ts_module, module) -> None:
    for i, (theirs, ours) in enumerate(zip(ts_module.layers, module.layers)):
        if not math.isclose(theirs.alpha, ours.alpha, rel_tol=1e-12):
            raise ValueError(
                f"layer {i}: torchscale alpha {theirs.alpha} != magneto alpha "
                f"{ours.alpha} (encoder_layers/decoder_layers do not match the model)"
            )


def _take_over(converted: nn.Module, module: nn.Module, state_dict: dict) -> nn.Module:
    """``converted`` on ``module``'s device and dtype, with its weights and training flag."""
    reference = next(module.parameters(), None)
    if reference is not None:
        converted.to(device=reference.device, dtype=reference.dtype)
    converted.load_state_dict(state_dict, strict=True)
    return converted.train(module.training)


def from_torchscale(module: nn.Module) -> nn.Module:
    """The magneto equivalent of a torchscale ``Encoder``, ``Decoder`` or ``EncoderDecoder``.

    Parameters are copied (not shared); train/eval mode, dtype and device follow ``module``.
    The caller's random number stream is left untouched. A model with layers wrapped for
    sharded data parallelism is refused (``magneto.compat.wrapping``).
    """
    ts_config, ts_encoder, ts_decoder, ts_encdec, embedding_mod = _torchscale()
    wrapped = wrapped_layers(module)
    if wrapped:
        raise ValueError(
            f"fsdp: {', '.join(name or '(the model)' for name in wrapped)} wrapped for sharded "
            "data parallelism (their parameters flattened or sharded): convert the model "
            "before wrapping it, or once unwrapped"
        )
    memo: dict = {}
    with torch.random.fork_rng(devices=[]):
        if isinstance(module, _beit3_class()):
            config = config_from_torchscale(module.args, "beit3")
            args = module.args
            converted = BEiT3(
                config, img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans
            )
            _detach_unowned(converted.encoder, module.encoder)
            _check_alphas(module.encoder, converted.encoder)
        elif isinstance(module, ts_encdec.EncoderDecoder):
            config = config_from_torchscale(module.args, "encoder_decoder")
            enc, dec = module.encoder, module.decoder
            tokens = [_embedding_from_torchscale(m, embedding_mod, memo) for m in _embeds(module)]
            projection = _copy_projection(dec.output_projection, dec.embed_tokens, tokens[2])
            converted = EncoderDecoder(config, *tokens, output_projection=projection)
            _detach_unowned(converted.encoder, enc)
            _detach_unowned(converted.decoder, dec)
            _check_alphas(enc, converted.encoder)
            _check_alphas(dec, converted.decoder)
        elif isinstance(module, (ts_encoder.Encoder, ts_decoder.Decoder)):
            # One half of an encoder-decoder (its init and DeepNorm alpha depend on both depths):
            # a decoder with cross-attention, or an encoder built from an EncoderDecoderConfig.
            is_encoder = isinstance(module, ts_encoder.Encoder)
            if is_encoder:
                is_encdec = isinstance(module.args, ts_config.EncoderDecoderConfig)
            else:
                is_encdec = bool(len(module.layers)) and module.layers[0].encoder_attn is not None
                if is_encdec and not hasattr(module.args, "encoder_layers"):
                    raise ValueError(
                        "a torchscale Decoder with cross-attention needs an "
                        "EncoderDecoderConfig (encoder_layers sets its init)"
                    )
            kind = "encoder_decoder" if is_encdec else ("encoder" if is_encoder else "decoder")
            config = config_from_torchscale(module.args, kind)
            tokens = _embedding_from_torchscale(module.embed_tokens, embedding_mod, memo)
            positions = _embedding_from_torchscale(module.embed_positions, embedding_mod, memo)
            projection = _copy_projection(module.output_projection, module.embed_tokens, tokens)
            cls = Encoder if is_encoder else Decoder
            converted = cls(config, tokens, positions, projection, is_encoder_decoder=is_encdec)
            _detach_unowned(converted, module)
            _check_alphas(module, converted)
        else:
            raise ValueError(
                "module must be a torchscale Encoder, Decoder or EncoderDecoder (or "
                f"a BEiT3), got {type(module).__module__}.{type(module).__name__}"
            )
    return _take_over(converted, module, module.state_dict())


# ------------------------------------------------------------------------------------------
# magneto -> torchscale

# packed magneto name -> the suffix of torchscale's q_proj/k_proj/v_proj names
_PACKED = {
    "in_proj.weight": ".weight",
    "in_proj.bias": ".bias",
    **{
        f"in_proj.{part}.{kind}": f".{part}.{kind}" for part in PARTS for kind in ("weight", "bias")
    },
}


def to_torchscale_state_dict(state_dict: dict, config: Optional[MagnetoConfig] = None) -> dict:
    """A magneto state dict with q/k/v unpacked into torchscale's ``{q,k,v}_proj`` entries
    (multiway: ``{q,k,v}_proj.A`` and ``.B``); None values (a gradient never computed) stay
    None for each. With the model's ``config`` and xPos, each self-attention also gets
    torchscale's constant ``xpos.scale`` buffer."""
    out = {}
    for key, value in state_dict.items():
        for packed, suffix in _PACKED.items():
            if key.endswith(packed):
                prefix = key[: -len(packed)]
                rows = [None] * 3 if value is None else value.chunk(3, dim=0)
                for name, part in zip(("q_proj", "k_proj", "v_proj"), rows):
                    out[f"{prefix}{name}{suffix}"] = None if part is None else part.clone()
                if config is not None and config.xpos_rel_pos and _xpos_site(prefix, packed):
                    out[f"{prefix}xpos.scale"] = xpos_scale(config.head_dim)
                break
        else:
            out[key] = value
    return out


def _xpos_site(prefix: str, packed: str) -> bool:
    """Whether the packed entry ``prefix + packed`` is the first of a self-attention's (where
    torchscale keeps an ``xpos.scale``)."""
    return prefix.endswith("self_attn.") and packed in ("in_proj.weight", "in_proj.A.weight")


def torchscale_args(config: MagnetoConfig, kind: str, no_output_layer: bool = False):
    """torchscale's ``EncoderConfig``/``DecoderConfig``/``EncoderDecoderConfig`` for ``config``."""
    ts_config = _torchscale()[0]
    if config.norm != "layer":
        raise ValueError(f"norm={config.norm!r}: torchscale has LayerNorm only")
    if callable(config.activation):
        raise ValueError(f"activation={config.activation!r}: torchscale takes a name only")
    if config.activation == "gelu_tanh":
        raise ValueError("activation='gelu_tanh' has no torchscale counterpart")
    if not config.bias:
        raise ValueError("bias=False: torchscale's projections always have biases")
    before = config.normalize_before
    activation = config.canonical_activation
    common = dict(
        activation_fn="swish" if activation == "silu" else activation,
        dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout,
        drop_path_rate=config.drop_path,
        no_scale_embedding=not config.scale_embedding,
        layernorm_eps=config.eps,
        deepnorm=config.norm_scheme == "deepnorm",
        subln=config.norm_scheme == "subln",
        vocab_size=config.vocab_size,
        no_output_layer=no_output_layer or not config.output_projection,
        checkpoint_activations=config.checkpoint_activations,
        multiway=config.multiway,
        rel_pos_buckets=config.rel_pos_buckets,
        max_rel_pos=config.max_rel_pos,
        moe_second_expert_policy=config.moe_second_expert_policy,
        **{name: getattr(config, name) for name in _OPTIONS},
    )
    sides = {}
    for side in ("encoder", "decoder"):
        sides.update(
            {
                f"{side}_embed_dim": config.embed_dim,
                f"{side}_attention_heads": config.num_heads,
                f"{side}_ffn_embed_dim": config.ffn_dim,
                f"{side}_layers": getattr(config, f"{side}_layers"),
                f"{side}_normalize_before": before,
            }
        )
    if kind == "encoder":
        keep = {k: v for k, v in sides.items() if k.startswith("encoder")}
        return ts_config.EncoderConfig(
            **common,
            **keep,
            normalize_output=config.normalize_output,
            max_source_positions=config.max_positions,
        )
    if kind == "decoder":
        keep = {k: v for k, v in sides.items() if k.startswith("decoder")}
        return ts_config.DecoderConfig(**common, **keep, max_target_positions=config.max_positions)
    return ts_config.EncoderDecoderConfig(
        **common,
        **sides,
        normalize_output=config.normalize_output,
        max_source_positions=config.max_positions,
        max_target_positions=config.max_positions,
    )


def _embedding_to_torchscale(module: Optional[nn.Module], embedding_mod, memo: dict):
    if module is None:
        return None
    if id(module) in memo:
        return memo[id(module)]
    if type(module) in (TokenEmbedding, LearnedPositionalEmbedding):
        cls = (
            embedding_mod.PositionalEmbedding
            if isinstance(module, LearnedPositionalEmbedding)
            else embedding_mod.TextEmbedding
        )
        converted = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
    else:
        converted = copy.deepcopy(module)
    memo[id(module)] = converted
    return converted


def to_torchscale(module: nn.Module) -> nn.Module:
    """The torchscale 0.3.0 equivalent of a magneto ``Encoder``, ``Decoder`` or ``EncoderDecoder``
    (parameters copied; the caller's random stream untouched). torchscale builds MoE layers
    only with ``torch.distributed`` initialised, each rank holding its experts as magneto's
    model does."""
    _, ts_encoder, ts_decoder, ts_encdec, embedding_mod = _torchscale()
    memo: dict = {}
    config = module.config
    if config.moe_freq > 0 and not torch.distributed.is_initialized():
        raise ValueError(
            f"moe_freq={config.moe_freq}: torchscale's MoE layers need torch.distributed "
            "initialised (torch.distributed.init_process_group; one process is enough)"
        )
    with torch.random.fork_rng(devices=[]):
        if isinstance(module, BEiT3):
            if module.text_embed.padding_idx is not None:
                raise ValueError(
                    f"padding_idx={module.text_embed.padding_idx}: torchscale's "
                    "BEiT3 text embedding has no padding row"
                )
            no_output_layer = module.encoder.output_projection is None
            args = torchscale_args(config, "encoder", no_output_layer=no_output_layer)
            vision = module.vision_embed
            args.multiway = True
            args.max_source_positions = config.max_positions + LearnedPositionalEmbedding.OFFSET
            args.img_size, args.patch_size = vision.img_size[0], vision.patch_size[0]
            args.in_chans = vision.in_chans
            converted = _beit3_class()(args)
        elif isinstance(module, EncoderDecoder):
            dec = module.decoder
            embeds = [_embedding_to_torchscale(m, embedding_mod, memo) for m in _embeds(module)]
            projection = _copy_projection(dec.output_projection, dec.embed_tokens, embeds[2])
            args = torchscale_args(config, "encoder_decoder", no_output_layer=projection is None)
            converted = ts_encdec.EncoderDecoder(args, *embeds, output_projection=projection)
        elif isinstance(module, (Encoder, Decoder)):
            is_encoder = isinstance(module, Encoder)
            tokens = _embedding_to_torchscale(module.embed_tokens, embedding_mod, memo)
            positions = _embedding_to_torchscale(module.embed_positions, embedding_mod, memo)
            projection = _copy_projection(module.output_projection, module.embed_tokens, tokens)
            args = torchscale_args(
                config, "encoder" if is_encoder else "decoder", no_output_layer=projection is None
            )
            cls = ts_encoder.Encoder if is_encoder else ts_decoder.Decoder
            converted = cls(
                args, tokens, positions, projection, is_encoder_decoder=module.is_encoder_decoder
            )
        else:
            raise ValueError(
                "module must be a magneto Encoder, Decoder or EncoderDecoder (or a "
                f"BEiT3), got {type(module).__name__}"
            )
    return _take_over(converted, module, to_torchscale_state_dict(module.state_dict(), config))
