"""magneto's fused ops in Hugging Face ``transformers`` models: Llama, BitNet, Kosmos-2, Kosmos-2.5.

``apply_magneto(model)`` patches the instances of one model in place: each attention, MLP/FFN and
decoder block of a supported family gets the family's replacement class (``replacements``), a
subclass of the transformers class that keeps its submodules and parameters and overrides
``forward`` only. Nothing of transformers changes: its classes and modules stay as they are, so
a model built afterwards (or another model in the process) runs transformers' own code.
Subclassing keeps what transformers attaches to the classes: ``GradientCheckpointingLayer``
wraps the ``forward`` of every subclass (so checkpointing survives), output recording
(``output_attentions``, ``output_hidden_states``) matches modules by ``isinstance``, and
``save_pretrained`` / ``from_pretrained`` see the same keys. Patching twice is a no-op. To patch
a pretrained model: ``apply_magneto(AutoModelForCausalLM.from_pretrained(...))``.

Layout: one module per family (``llama``, ``bitnet``, ``kosmos2``, ``kosmos2_5``) supplying what
differs, over the shared forwards (``_blocks``: self-attention, feed-forward, the pre-norm block)
and the fused calls (``_projections``: one adapter per linear class, the group call site of
q/k/v and gate/up, the output projection).

What runs fused (``magneto_kernels.ln_linear`` and ``ln_linear_group``; the norm is recomputed
inside each call, so the normalised activations are never stored for backward): in every family
the block's pre-norm into its input projections and both residual adds into the output
projections; per family, the family module's docstring. gate/up (and q/k/v) run as one
``magneto_kernels.ln_linear_group`` (x normalised once, one output per projection, the input
gradient summed inside the op).

BitNet's quantised projections (transformers' ``AutoBitLinear`` online and offline, packed
``BitLinear``) run as ``ln_linear``'s quantised modes (``quant=``), their weights packed into
the kernels' 2-bit layout at patch time and, offline, transformers' copy dropped
(``_projections.PackedProjection``: ``state_dict`` still writes it; ``get_memory_footprint``
counts the bytes resident, ``_projections.memory_footprint``). The model's head runs as
``ln_linear`` without a norm (``output_projection="dense"``, the default: the few-row kernel when
decoding on CPU), with per-row int8 weights (``"int8"``), or as transformers' (None): ``_head``.

Left unfused, running the model's own code: projections that no adapter of
``_projections.PROJECTIONS`` accepts at call time (anything but a plain ``nn.Linear`` or
BitNet's classes: PEFT's LoRA layers, hooked projections; an offline BitNet projection whose
in_features is not a multiple of 128),
which then work as usual, fed by the norm module's own output, and which ``apply_magneto`` names
in a warning; norms ln_linear cannot recompute; activations the ops do not have (they run
unfused before the fused norm and projection).

Numerics: in float32 the results match transformers' to rounding. Llama's and BitNet's RMSNorm
rounds the normalised row to the input dtype before multiplying by its weight; the fused op
multiplies in float32 and rounds once, so in bf16/fp16 the two differ by one rounding. Dropout
draws magneto's Philox masks from torch's generator (reproducible from ``torch.manual_seed``),
not torch's masks, so a patched model trains with other masks than the unpatched one.

Module outputs: a patched attention module returns ``residual + attention output`` as its
first output (the residual add is folded into its output projection); the attention weights
(its second output, which ``output_attentions`` records) are unchanged.

Versions: the replacement forwards follow transformers' own, which change between releases
(5.24 renamed the attention's cache argument: the forwards written for 5.23 then decode without
their cache, silently). ``apply_magneto`` therefore refuses a transformers outside
``TRANSFORMERS_RANGE``, whose two ends the tests run under.
"""

from __future__ import annotations

import functools
import importlib
import logging

import transformers
from packaging.specifiers import SpecifierSet
from torch import nn

from ._head import set_output_projection
from ._projections import PROJECTIONS, MagnetoOptions, memory_footprint

logger = logging.getLogger(__name__)

TRANSFORMERS_RANGE = ">=5.18.0,<5.24"
"""The transformers releases the replacement forwards are written for, as a pip specifier. The
oldest (5.18.0) and the newest (5.23.0) are tested; 5.17 and older require huggingface_hub < 2,
5.24 renamed the attention's cache argument."""

MODEL_TYPES = {
    "llama": "llama",
    "bitnet": "bitnet",
    "kosmos-2": "kosmos2",
    "kosmos_2_text_model": "kosmos2",
    "kosmos-2.5": "kosmos2_5",
    "kosmos_2_5_text_model": "kosmos2_5",
}
"""``config.model_type`` -> the family module (of this package) that patches it."""


def check_transformers_version(version: str) -> None:
    """RuntimeError unless ``version`` (a transformers release) lies in ``TRANSFORMERS_RANGE``."""
    if not SpecifierSet(TRANSFORMERS_RANGE).contains(version):
        raise RuntimeError(
            f"magneto.integrations.transformers supports transformers{TRANSFORMERS_RANGE},"
            f" found {version}: its patched forwards follow transformers' own, and under another"
            " release they may compute something else without an error. Install one in the"
            f" range (pip install 'transformers{TRANSFORMERS_RANGE}')."
        )


def replacements(family: str) -> dict:
    """The family's ``{transformers class: replacement class}`` (``family``: a value of
    ``MODEL_TYPES``). RuntimeError for a transformers outside ``TRANSFORMERS_RANGE``."""
    check_transformers_version(transformers.__version__)
    return importlib.import_module(f"{__name__}.{family}").REPLACEMENTS


def _family_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"apply_magneto supports the model types {tuple(MODEL_TYPES)}, got {model_type!r}"
            f" ({type(model).__name__})"
        )
    return MODEL_TYPES[model_type]


_PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")
_PROJECTION_NAMES += ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")


def apply_magneto(model: nn.Module, **options) -> nn.Module:
    """Patch the modules of ``model`` (a Llama, BitNet, Kosmos-2 or Kosmos-2.5 model of
    transformers, or a wrapper such as a PEFT model) in place to run magneto's fused ops, and
    return it.

    ``options``: the fields of ``MagnetoOptions``. Dispatches on ``model.config.model_type``
    (``MODEL_TYPES``); ValueError for another, RuntimeError for a transformers outside
    ``TRANSFORMERS_RANGE``. For Kosmos-2 and Kosmos-2.5 the text decoder is patched and the
    vision tower left alone. Projections that will run unfused are named in one warning.
    Patching twice is a no-op, except that a second call sets the options and, where their
    weights are kept (``keep_weights=True``), packs BitNet's offline weights again.
    """
    table = replacements(_family_of(model))
    settings = MagnetoOptions(**options)
    head = set_output_projection(model, settings)
    patched = set(table.values())
    unfused = [] if head is None else [head]
    for name, module in model.named_modules():
        if type(module) in table:
            module.__class__ = table[type(module)]
        if type(module) in patched:
            module._magneto_options = settings
            for proj in _PROJECTION_NAMES:
                linear = getattr(module, proj, None)
                if linear is None:
                    continue
                kind = type(linear).__name__
                adapter = PROJECTIONS.get(type(linear))
                why = None
                if adapter is not None and hasattr(adapter, "prepare"):
                    why = adapter.prepare(f"{name}.{proj}", linear, settings)
                if adapter is None:
                    unfused.append(f"{name}.{proj} ({kind})")
                elif why is not None:
                    unfused.append(f"{name}.{proj} ({kind}: {why})")
    for module in model.modules():  # the dropped weights' bytes are not resident
        if isinstance(module, transformers.PreTrainedModel):
            module.get_memory_footprint = functools.partial(memory_footprint, module)
    if unfused:
        logger.warning(
            "magneto: these projections have no fused form and run unfused: %s",
            ", ".join(unfused),
        )
    return model


__all__ = [
    "MODEL_TYPES",
    "TRANSFORMERS_RANGE",
    "MagnetoOptions",
    "apply_magneto",
    "check_transformers_version",
    "replacements",
]
