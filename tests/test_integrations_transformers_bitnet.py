"""apply_magneto on BitNet with AutoBitLinear projections (online: master weights, training;
offline: ternary weights and weight_scale): every projection of every layer, with the norm
before it (input RMSNorm, attn_sub_norm, post-attention RMSNorm, ffn_sub_norm of relu2(gate)·up)
and both residual adds, runs as one call of the quantised projection's formula, side by side
with the unpatched model: logits, every gradient (online), greedy tokens."""

import copy
import logging

import pytest
import torch
from transformers_models import LAYERS, bitnet, check_grads, close, ids

transformers = pytest.importorskip("transformers")

from transformers.integrations.bitnet import AutoBitLinear  # noqa: E402

from magneto.integrations import transformers as mt  # noqa: E402
from magneto_kernels import quant  # noqa: E402

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


@pytest.fixture
def quantised_calls(monkeypatch):
    calls = []
    original = quant.ln_linear_bitnet

    def counting(*args, **kwargs):
        calls.append(kwargs.get("input_activation"))
        return original(*args, **kwargs)

    monkeypatch.setattr(quant, "ln_linear_bitnet", counting)
    return calls


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_autobitlinear_bitnet_matches_transformers(online, quantised_calls, caplog):
    model = _quantised(online)
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    assert "AutoBitLinear" not in caplog.text  # nothing named as left unfused
    assert list(model.state_dict()) == list(reference.state_dict())  # save_pretrained's keys
    tokens = ids()
    out = model(tokens, labels=tokens)
    expected = reference(tokens, labels=tokens)
    close(out.logits, expected.logits, what="logits")
    # per layer: q, k, v, o (attn_sub_norm + residual), gate, up, down (ffn_sub_norm of relu2_glu)
    assert len(quantised_calls) == LAYERS * 7
    assert quantised_calls.count("relu2_glu") == LAYERS
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
