"""apply_magneto on BitNet with AutoBitLinear projections (online: master weights, training;
offline: ternary weights and weight_scale): until the quantised op has kernels, every
AutoBitLinear runs as its own module fed by the norm module (its reference formula in PyTorch
ops was slower than transformers' own path), named in apply_magneto's warning; the rest of the
layer stays patched. Side by side with the unpatched model: logits, every gradient (online),
greedy tokens, state-dict keys."""

import copy
import logging

import pytest
import torch
from transformers.integrations.bitnet import AutoBitLinear
from transformers_models import (
    bitnet,
    check_grads,
    close,
    ids,
    mt,
)

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantised(online: bool):
    torch.manual_seed(0)
    model = bitnet()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ:
                linear = getattr(parent, name, None)
                if linear is None:
                    continue
                q = AutoBitLinear(
                    linear.in_features, linear.out_features, bias=linear.bias is not None,
                    online_quant=online,
                )  # fmt: skip
                if online:
                    q.weight.data.copy_(linear.weight)
                else:
                    q.weight.data.copy_(torch.randint(-1, 2, linear.weight.shape).float())
                    q.weight_scale.fill_(0.02)
                    q.requires_grad_(False)
                setattr(parent, name, q)
    return model


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_autobitlinear_bitnet_runs_unfused_and_named(online, fused_calls, caplog):
    model = _quantised(online)
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    for name in PROJ:
        assert (
            f"model.layers.0.{'mlp' if name in PROJ[4:] else 'self_attn'}.{name} (AutoBitLinear)"
            in caplog.text
        )
    assert list(model.state_dict()) == list(reference.state_dict())  # save_pretrained's keys
    tokens = ids()
    out = model(tokens, labels=tokens)
    expected = reference(tokens, labels=tokens)
    close(out.logits, expected.logits, what="logits")
    assert fused_calls.count == 0  # every projection of the layer is quantised
    if online:
        out.loss.backward()
        expected.loss.backward()
        check_grads(model, reference)


def test_autobitlinear_bitnet_greedy_tokens_identical():
    model = _quantised(online=False)
    reference = copy.deepcopy(model)
    mt.apply_magneto(model)
    tokens = ids(length=5)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(tokens, **settings), reference.generate(tokens, **settings))
