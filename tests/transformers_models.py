"""What the tests of magneto.integrations.transformers share: tiny random models of each family,
the patched/unpatched pair, inputs, the closeness check and the count of fused calls.

Tiny random configs (hidden 64, 2 layers, vocab 100, dropouts 0 unless a test is about
dropout), float32: logits and every parameter gradient within 1e-5 (norm-wise relative) of a
deep copy taken before patching.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import assert_close

import magneto_kernels

transformers = pytest.importorskip("transformers")

from magneto.integrations import transformers as mt  # noqa: E402

RTOL = 1e-5
VOCAB = 100
LAYERS = 2


def _llama_like(config_cls, model_cls, **overrides):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    config = config_cls(**{**fields, **overrides})
    return model_cls(config)


def llama(**overrides):
    return _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, **overrides)


def bitnet(**overrides):
    # BitNet's default bos/eos tokens lie outside the tiny vocabulary
    settings = dict(bos_token_id=1, eos_token_id=2, **overrides)
    return _llama_like(transformers.BitNetConfig, transformers.BitNetForCausalLM, **settings)


def kosmos_text_config(config_cls, **overrides):
    settings = dict(
        vocab_size=VOCAB,
        embed_dim=64,
        ffn_dim=128,
        layers=LAYERS,
        attention_heads=4,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    settings.update(overrides)
    return config_cls(**settings)


def kosmos2(**overrides):
    config = kosmos_text_config(transformers.Kosmos2TextConfig, **overrides)
    return transformers.models.kosmos2.modeling_kosmos2.Kosmos2TextForCausalLM(config)


def kosmos2_5(**overrides):
    config = kosmos_text_config(transformers.Kosmos2_5TextConfig, **overrides)
    return transformers.models.kosmos2_5.modeling_kosmos2_5.Kosmos2_5TextForCausalLM(config)


BUILD = {"llama": llama, "bitnet": bitnet, "kosmos2": kosmos2, "kosmos2_5": kosmos2_5}
FAMILIES = tuple(BUILD)

FUSED_PER_LAYER = {"llama": 4, "bitnet": 4, "kosmos2": 4, "kosmos2_5": 4}
"""Fused calls of one layer's forward: q/k/v (one group), the output projection, gate/up (one
group) or fc1, down_proj or fc2."""

HEAD = 1
"""Fused calls of the model's head per forward: ``ln_linear`` without a norm
(``output_projection="dense"``, the default)."""

CONCAT_PER_LAYER = {"llama": 1, "bitnet": 1, "kosmos2": 0, "kosmos2_5": 0}
"""Of those, the group calls that write their outputs side by side (``concat=True``): gate/up,
which down_proj reads as one ``[gate | up]`` (no concatenation after the call)."""


def pair(family, seed=0, **overrides):
    """(patched model, unpatched deep copy taken before patching)."""
    torch.manual_seed(seed)
    model = BUILD[family](**overrides)
    reference = copy.deepcopy(model)
    return mt.apply_magneto(model), reference


def ids(batch=2, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def close(actual, expected, rtol=RTOL, what="output"):
    """Norm-wise relative error within rtol, with an absolute floor of rtol / 10 per element for
    values that are zero up to rounding (a key bias's gradient cannot change the softmax)."""
    assert_close(actual, expected, rtol, atol=0.1 * rtol * expected.numel() ** 0.5, name=what)


def check_grads(model, reference):
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        close(p.grad, q.grad, what=f"grad of {name}")


def patched_types(model):
    return {type(m) for m in model.modules() if type(m).__name__.startswith("Magneto")}


class FusedCalls:
    """Counts the integration's ``magneto_kernels.ln_linear`` and ``ln_linear_group`` calls
    (``fused_calls`` fixture; a group is one call), and in ``concat`` the group calls with
    ``concat=True``."""

    def __init__(self, monkeypatch):
        self.count = self.concat = 0
        for name in ("ln_linear", "ln_linear_group"):
            original = getattr(magneto_kernels, name)

            def counting(*args, original=original, **kwargs):
                self.count += 1
                self.concat += bool(kwargs.get("concat"))
                return original(*args, **kwargs)

            monkeypatch.setattr(magneto_kernels, name, counting)
