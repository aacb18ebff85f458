"""magneto.integrations.transformers refuses to fuse what it does not recognise: projections of
another class (BitNet's packed BitLinear, PEFT's LoRA layers, a subclass of nn.Linear)
or with hooks run as their own modules, fed by the norm module, with a warning at patch time
naming each; the others stay fused (their calls counted), and the results are transformers'.
Shared helpers: tests/transformers_models.py."""

import copy
import logging

import pytest
import torch
from torch import nn
from transformers_models import (
    FUSED_PER_LAYER,
    HEAD,
    LAYERS,
    bitnet,
    check_grads,
    close,
    ids,
    llama,
    mt,
    patched_types,
)


class _UnknownLinear(nn.Linear):
    """A subclass of nn.Linear: its forward may be anything, so it is not read as a Linear."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_packed_bitlinear_projection_stays_unfused(caplog, fused_calls):
    """BitLinear (packed 2-bit weights) whose in_features is not a multiple of the offline
    kernels' packing unit (128): it runs as its module, named with the reason."""
    from transformers.integrations.bitnet import BitLinear, pack_weights

    torch.manual_seed(0)
    model = bitnet()
    attention = model.model.layers[0].self_attn
    quantised = BitLinear(64, 64, bias=False, dtype=torch.float32)
    quantised.weight.copy_(pack_weights(torch.randint(-1, 2, (64, 64), dtype=torch.int8)))
    quantised.weight_scale.fill_(20.0)
    attention.q_proj = quantised
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    assert (
        "model.layers.0.self_attn.q_proj (BitLinear: in_features 64 is not a multiple of 128)"
        in caplog.text
    )
    tokens = ids()
    close(model(tokens).logits, reference(tokens).logits, what="logits")
    assert fused_calls.count == LAYERS * FUSED_PER_LAYER["bitnet"] + HEAD  # k/v still one group


def test_unknown_projection_class_and_hooked_projection_stay_unfused(caplog, fused_calls):
    """A projection of an unknown class is named at patch time; a hooked one (offloading hooks
    move the weight) is found at call time; the hook still runs."""
    torch.manual_seed(0)
    model = llama()
    mlp = model.model.layers[1].mlp
    unknown = _UnknownLinear(128, 64, bias=False)
    unknown.weight.data.copy_(mlp.down_proj.weight)
    mlp.down_proj = unknown
    hooked = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *_: hooked.append(1))
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    assert "model.layers.1.mlp.down_proj (_UnknownLinear)" in caplog.text
    assert "k_proj" not in caplog.text
    tokens = ids()
    out, expected = model(tokens, labels=tokens), reference(tokens, labels=tokens)
    assert fused_calls.count == LAYERS * FUSED_PER_LAYER["llama"] - 1 + HEAD  # q/v still one group
    assert len(hooked) == 2  # the patched model's call and the reference's
    close(out.logits, expected.logits, what="logits")
    out.loss.backward()
    expected.loss.backward()
    check_grads(model, reference)


def test_backward_hooked_projection_and_global_hooks_stay_unfused(fused_calls):
    """magneto.fusion's rule: a backward hook on a projection, or a global module hook, makes the
    integration call the module (so the hook fires), as a forward hook does."""
    torch.manual_seed(0)
    model = llama()
    fired = []
    v_proj = model.model.layers[0].self_attn.v_proj
    v_proj.register_full_backward_hook(lambda *_: fired.append("v"))
    reference = copy.deepcopy(model)
    mt.apply_magneto(model)
    tokens = ids()
    out, expected = model(tokens, labels=tokens), reference(tokens, labels=tokens)
    assert fused_calls.count == LAYERS * FUSED_PER_LAYER["llama"] + HEAD  # q/k one group, v alone
    out.loss.backward()
    expected.loss.backward()
    assert fired == ["v", "v"]
    check_grads(model, reference)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        fused_calls.count = 0
        model(tokens)
    finally:
        handle.remove()
    assert fused_calls.count == HEAD  # the head's module itself runs it: its hooks fire


@pytest.mark.parametrize("order", ["peft_first", "magneto_first"])
def test_peft_lora_projections_fall_back(order, fused_calls):
    """LoRA layers are not plain nn.Linear: those projections run PEFT's forward on the norm
    module's output, the others stay fused, and LoRA trains as on the unpatched model."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0)
    torch.manual_seed(0)
    base = llama()
    reference = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    if order == "peft_first":
        model = mt.apply_magneto(peft.get_peft_model(base, lora))
    else:
        model = peft.get_peft_model(mt.apply_magneto(base), lora)
    for name, p in reference.named_parameters():  # LoRA's B starts at zero: move it off
        if "lora_B" in name:
            torch.manual_seed(len(name))
            p.data.normal_()
    model.load_state_dict(reference.state_dict())
    assert len(patched_types(model)) == 3
    tokens = ids()
    out = model(input_ids=tokens, labels=tokens)
    assert fused_calls.count == LAYERS * (FUSED_PER_LAYER["llama"] - 1) + HEAD  # k alone, no down
    expected = reference(input_ids=tokens, labels=tokens)
    close(out.logits, expected.logits, what="logits")
    out.loss.backward()
    expected.loss.backward()
    check_grads(model, reference)
