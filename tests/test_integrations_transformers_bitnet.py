"""apply_magneto on BitNet with transformers' quantised projections: AutoBitLinear online
(master weights, training), AutoBitLinear offline (ternary weights and weight_scale) and packed
BitLinear, each as ln_linear's quantised mode (the offline weights packed at patch time), all
four norm sites per layer and both residual adds fused. Side by side with the unpatched model:
fp32 logits (and, online, every gradient), identical greedy tokens with the KV cache, bf16
within bf16 rounding, what save_pretrained writes, from_pretrained of a quantised checkpoint
saved by transformers, the fused-call count; what cannot be fused (in_features not a multiple
of 128) stays unfused and named, a non-ternary offline weight is refused naming the module.

Hidden 128, intermediate 256: the offline kernels' packing unit is 128."""

import copy
import logging

import pytest
import torch
from harness import assert_close_to_reference
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights
from transformers_models import LAYERS, bitnet, check_grads, close, ids, mt

from magneto_kernels import quant

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("online", "offline", "bitlinear")
FUSED_PER_LAYER = len(PROJ)  # q/k/v and gate/up one call each until the quantised group
WIDTHS = dict(hidden_size=128, intermediate_size=256)


def _projections(model):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ:
                if hasattr(parent, name):
                    yield parent, name, getattr(parent, name)


def _quantised(mode: str, dtype=torch.float32, seed=0, **widths):
    """A tiny BitNet whose projections are transformers' class of ``mode``, random weights
    (ternary ones offline, with per-projection scales)."""
    torch.manual_seed(seed)
    model = bitnet(**(widths or WIDTHS)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    for i, (parent, name, linear) in enumerate(_projections(model)):
        shape = linear.weight.shape
        ternary = torch.randint(-1, 2, shape, generator=gen).to(dtype)
        scale = 0.01 + 0.002 * i
        if mode == "bitlinear":
            q = BitLinear(shape[1], shape[0], bias=False, dtype=dtype)
            q.weight.copy_(pack_weights(ternary.to(torch.int8).clone()))
            q.weight_scale.fill_(1.0 / scale)
        else:
            q = AutoBitLinear(shape[1], shape[0], bias=False, online_quant=mode == "online")
            q = q.to(dtype)
            if mode == "online":
                q.weight.data.copy_(linear.weight)
            else:
                q.weight.data.copy_(ternary)
                q.weight_scale.fill_(scale)
                q.requires_grad_(False)
        setattr(parent, name, q)
    return model


def _pair(mode, dtype=torch.float32):
    model = _quantised(mode, dtype)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("backend", [b for b in quant.BACKENDS if b != "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_and_matching_unpatched(mode, backend, fused_calls, caplog):
    model, reference = _pair(mode)
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model, backend=backend)
    assert "run unfused" not in caplog.text
    assert list(model.state_dict()) == list(reference.state_dict())  # save_pretrained's keys
    tokens = ids()
    out = model(tokens, labels=tokens)
    expected = reference(tokens, labels=tokens)
    assert fused_calls.count == FUSED_PER_LAYER * LAYERS
    close(out.logits, expected.logits, what="logits")
    if mode == "online":
        out.loss.backward()
        expected.loss.backward()
        check_grads(model, reference)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_identical(mode):
    model, reference = _pair(mode)
    mt.apply_magneto(model)
    tokens = ids(length=5)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            model.generate(tokens, **settings), reference.generate(tokens, **settings)
        )


@pytest.mark.parametrize("mode", ("offline", "bitlinear"))
def test_bf16_within_bf16_rounding(mode):
    """Patched bf16 logits as close to the fp32 model's (the same weights and scales) as the
    unpatched bf16 model's are, or within bf16's tolerance."""
    model, reference = _pair(mode, torch.bfloat16)
    model32 = copy.deepcopy(reference).float()
    for m in model32.modules():
        if isinstance(m, BitLinear):
            m.dtype = torch.float32  # the dtype it unpacks its weight to
    mt.apply_magneto(model)
    tokens = ids()
    with torch.no_grad():
        assert_close_to_reference(
            model(tokens).logits, model32(tokens).logits, reference(tokens).logits, "logits"
        )


@pytest.mark.parametrize("mode", MODES)
def test_save_pretrained_writes_what_transformers_would(mode, tmp_path):
    from safetensors.torch import load_file

    model, reference = _pair(mode)
    mt.apply_magneto(model)
    model.save_pretrained(tmp_path / "patched")
    reference.save_pretrained(tmp_path / "reference")
    ours = load_file(tmp_path / "patched" / "model.safetensors")
    theirs = load_file(tmp_path / "reference" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_from_pretrained_of_a_quantised_checkpoint(tmp_path):
    """A tiny BitNet with offline AutoBitLinear projections and transformers' quantisation
    config, saved by transformers, loaded back by from_pretrained (its BitNet quantizer builds
    the AutoBitLinear modules), then patched: the same logits as unpatched."""
    import transformers
    from transformers import BitNetQuantConfig

    source = _quantised("offline")
    source.config.quantization_config = BitNetQuantConfig(
        linear_class="autobitlinear", quantization_mode="offline"
    )
    source.save_pretrained(tmp_path)
    loaded = transformers.BitNetForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, AutoBitLinear)
    reference = copy.deepcopy(loaded)
    mt.apply_magneto(loaded)
    tokens = ids()
    with torch.no_grad():
        close(loaded(tokens).logits, reference(tokens).logits, what="logits")
        close(loaded(tokens).logits, source(tokens).logits, what="logits against the source")


def test_width_not_a_multiple_of_the_packing_unit_stays_unfused(caplog, fused_calls):
    model = _quantised("offline", hidden_size=64, intermediate_size=128)
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    assert "self_attn.q_proj (AutoBitLinear: in_features 64 is not a multiple of 128)" in (
        caplog.text
    )
    tokens = ids()
    with torch.no_grad():
        close(model(tokens).logits, reference(tokens).logits, what="logits")
    assert "down_proj" not in caplog.text  # in_features 128: fused
    assert fused_calls.count == LAYERS  # down_proj's


@pytest.mark.parametrize("mode", MODES)
def test_a_backend_without_quantised_kernels_runs_the_modules(mode, fused_calls, monkeypatch):
    """On a backend without quantised kernels (cuda has none; here triton taken out of
    ``quant.BACKENDS``, since no CUDA runs here) the projections run as transformers' modules,
    named in a warning, with no fused projection call, and the norms and adds around them stay
    fused."""
    from magneto import UnfusedWarning

    monkeypatch.setattr(quant, "BACKENDS", tuple(b for b in quant.BACKENDS if b != "triton"))
    model, reference = _pair(mode)
    mt.apply_magneto(model, backend="triton")
    tokens = ids()
    with pytest.warns(UnfusedWarning, match="runs on the triton backend, which has no quant"):
        with torch.no_grad():
            out = model(tokens).logits
    assert fused_calls.count == 0
    close(out, reference(tokens).logits, what="logits")


def test_non_ternary_offline_weight_refused_naming_the_module():
    model = _quantised("offline")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: .*not ternary"):
        mt.apply_magneto(model)


def test_weights_changed_in_place_are_packed_again():
    model, reference = _pair("offline")
    mt.apply_magneto(model)
    with torch.no_grad():
        for m in (model, reference):
            m.model.layers[0].self_attn.q_proj.weight.mul_(-1)
    tokens = ids()
    with torch.no_grad():
        close(model(tokens).logits, reference(tokens).logits, what="logits")


def test_peft_lora_on_quantised_projections_falls_back(fused_calls, caplog):
    """PEFT LoRA around online AutoBitLinear projections: those run PEFT's forward on the norm
    module's output, named in the warning; the others stay fused; logits as unpatched."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0)
    base = _quantised("online")
    reference = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    model = peft.get_peft_model(base, lora)
    for name, p in reference.named_parameters():  # LoRA's B starts at zero: move it off
        if "lora_B" in name:
            torch.manual_seed(len(name))
            p.data.normal_()
    model.load_state_dict(reference.state_dict())
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    assert "self_attn.q_proj (Linear)" in caplog.text  # PEFT's lora.Linear
    tokens = ids()
    with torch.no_grad():
        out = model(input_ids=tokens).logits
        expected = reference(input_ids=tokens).logits
    assert fused_calls.count == LAYERS * (FUSED_PER_LAYER - 2)  # q and v fall back
    close(out, expected, what="logits")
