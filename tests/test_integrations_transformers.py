"""magneto.integrations.transformers: patched transformers models match the unpatched ones.

Tiny random configs (hidden 64, 2 layers, vocab 100, dropouts 0 unless a test is about
dropout), float32: logits and every parameter gradient within 1e-5 (norm-wise relative) of a
deep copy taken before patching; greedy generation token for token; what keeps working around
the patch (state dict, checkpoints, gradient checkpointing, output recording, caches, padding,
PEFT, torch.compile, training).

Until the gated kernels are built, run with MAGNETO_BACKEND=reference (Llama's and BitNet's
down_proj take a gated input activation).
"""

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from magneto.integrations import transformers as mt  # noqa: E402

RTOL = 1e-5
VOCAB = 100


def _llama(**overrides):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        **overrides,
    )
    return transformers.LlamaForCausalLM(config)


def _bitnet(**overrides):
    config = transformers.BitNetConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,  # BitNet's defaults lie outside the tiny vocabulary
        eos_token_id=2,
        **overrides,
    )
    return transformers.BitNetForCausalLM(config)


def _kosmos_text(config_cls, **overrides):
    settings = dict(
        vocab_size=VOCAB,
        embed_dim=64,
        ffn_dim=128,
        layers=2,
        attention_heads=4,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    settings.update(overrides)
    return config_cls(**settings)


def _kosmos2(**overrides):
    config = _kosmos_text(transformers.Kosmos2TextConfig, **overrides)
    return transformers.models.kosmos2.modeling_kosmos2.Kosmos2TextForCausalLM(config)


def _kosmos2_5(**overrides):
    config = _kosmos_text(transformers.Kosmos2_5TextConfig, **overrides)
    return transformers.models.kosmos2_5.modeling_kosmos2_5.Kosmos2_5TextForCausalLM(config)


BUILD = {"llama": _llama, "bitnet": _bitnet, "kosmos2": _kosmos2, "kosmos2_5": _kosmos2_5}
FAMILIES = tuple(BUILD)


def _pair(family, seed=0, **overrides):
    """(patched model, unpatched deep copy taken before patching)."""
    torch.manual_seed(seed)
    model = BUILD[family](**overrides)
    reference = copy.deepcopy(model)
    return mt.apply_magneto(model), reference


def _ids(batch=2, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def _close(actual, expected, rtol=RTOL, what=""):
    """Norm-wise relative error within rtol, with an absolute floor of rtol / 10 per element for
    gradients that are zero up to rounding (a key bias cannot change the softmax)."""
    error = (actual - expected).norm()
    bound = rtol * (expected.norm() + 0.1 * expected.numel() ** 0.5)
    assert error <= bound, (
        f"{what}: error {error:.3g} > {bound:.3g} (|expected| {expected.norm():.3g})"
    )


def _check_grads(model, reference):
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        _close(p.grad, q.grad, what=f"grad of {name}")


def _patched_types(model):
    return {type(m) for m in model.modules() if type(m).__name__.startswith("Magneto")}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match(family, attn):
    model, reference = _pair(family, attn_implementation=attn)
    assert len(_patched_types(model)) == 3
    assert list(model.state_dict()) == list(reference.state_dict())
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    out = model(ids, attention_mask=mask, labels=ids)
    expected = reference(ids, attention_mask=mask, labels=ids)
    _close(out.logits, expected.logits, what="logits")
    out.loss.backward()
    expected.loss.backward()
    _check_grads(model, reference)


@pytest.mark.parametrize("family", ["llama", "kosmos2"])
def test_bfloat16_within_its_rounding(family):
    """In bf16 the results differ from transformers' by rounding only (for Llama's RMSNorm, the
    one extra rounding of the normalised row before its weight multiplies it)."""
    model, reference = _pair(family)
    model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    ids = _ids()
    out = model(ids).logits.float()
    _close(out, reference(ids).logits.float(), rtol=2e-2, what="bf16 logits")


def test_concatenated_weights_match():
    """gate/up and q/k/v as one call on concatenated weights: with gradients when asked for
    (concat_min_rows=0), and by default without gradients from rows >= hidden on (80 >= 64)."""
    model, reference = _pair("llama")
    ids = _ids(batch=2, length=40)
    with torch.no_grad():
        _close(model(ids).logits, reference(ids).logits, what="no-grad logits")
    mt.apply_magneto(model, concat_min_rows=0)
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    _check_grads(model, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_identical(family):
    model, reference = _pair(family)
    ids = _ids(length=5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens = model.generate(ids, **settings)
    assert tokens.shape[1] == 13
    assert torch.equal(tokens, reference.generate(ids, **settings))


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_and_hidden_states(family):
    model, reference = _pair(family, attn_implementation="eager")
    ids = _ids()
    flags = dict(output_attentions=True, output_hidden_states=True)
    out, expected = model(ids, **flags), reference(ids, **flags)
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    assert len(out.attentions) == len(expected.attentions) == 2
    for a, b in zip(
        out.hidden_states + out.attentions, expected.hidden_states + expected.attentions
    ):
        _close(a, b, what="recorded output")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_still_checkpoints(family):
    model, reference = _pair(family)
    for m in (model, reference):
        m.gradient_checkpointing_enable()
        m.train()
    calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    ids = _ids()
    loss = model(ids, labels=ids).loss
    forward_calls = len(calls)
    loss.backward()
    assert forward_calls == 2
    assert len(calls) == 2 * forward_calls  # the backward recomputed every layer
    reference(ids, labels=ids).loss.backward()
    _check_grads(model, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path, monkeypatch):
    model, reference = _pair(family)
    ids = _ids()
    model.save_pretrained(tmp_path)
    loaded = type(reference).from_pretrained(tmp_path)
    assert not _patched_types(loaded)
    _close(loaded(ids).logits, reference(ids).logits, what="unpatched load")

    modeling = __import__(mt._MODELING[family], fromlist=["_"])
    for original in mt.replacements(family):  # undone at teardown
        monkeypatch.setattr(modeling, original.__name__, original)
    getattr(mt, f"apply_magneto_to_{family}")()
    getattr(mt, f"apply_magneto_to_{family}")()  # twice: a no-op
    loaded = type(reference).from_pretrained(tmp_path)
    assert _patched_types(loaded) == set(mt.replacements(family).values())
    _close(loaded(ids).logits, reference(ids).logits, what="patched load")


def test_patching_twice_is_a_no_op():
    model, reference = _pair("llama")
    mt.apply_magneto(model)
    assert _patched_types(model) == set(mt.replacements("llama").values())
    ids = _ids()
    _close(model(ids).logits, reference(ids).logits, what="logits")


def test_unsupported_model_type():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="llama.*bitnet.*kosmos"):
        mt.apply_magneto(transformers.GPT2LMHeadModel(config))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_converges_alike(family):
    model, reference = _pair(family)
    ids = _ids()
    losses = {}
    for name, m in (("patched", model), ("reference", reference)):
        m.train()
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = m(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    for got, want in zip(losses["patched"], losses["reference"]):
        assert abs(got - want) <= 1e-4 * abs(want)
    assert losses["patched"][-1] < losses["patched"][0]
    # All parameters as one vector: AdamW divides a gradient by its own running size, so a
    # gradient that is zero up to rounding (k_proj's bias) takes lr-sized steps in the
    # direction of its rounding noise, which differs between any two implementations.
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = torch.cat([q.detach().flatten() for q in reference.parameters()])
    _close(trained, expected, rtol=1e-4, what="trained parameters")


@pytest.mark.parametrize("family", ["llama", "bitnet"])
def test_compile_fullgraph(family):
    """aot_eager traces forward and backward through the ops' fake kernels and autograd
    registrations in one graph, as inductor would, at a fraction of CPU compile time."""
    model, reference = _pair(family)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = _ids()
    out = compiled(ids, labels=ids)
    expected = reference(ids, labels=ids)
    _close(out.logits, expected.logits, what="compiled logits")
    out.loss.backward()
    expected.loss.backward()
    _check_grads(model, reference)


@pytest.mark.parametrize("family", ["kosmos2", "kosmos2_5"])
def test_dropout_reproducible_from_the_seed(family):
    torch.manual_seed(0)
    model = mt.apply_magneto(BUILD[family](dropout=0.2, activation_dropout=0.1))
    model.train()
    ids = _ids()

    def loss_and_grads(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (loss, grads), (again, grads_again) = loss_and_grads(3), loss_and_grads(3)
    assert torch.equal(loss, again)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    assert not torch.equal(loss, loss_and_grads(4)[0])
    model.eval()
    with torch.no_grad():
        assert not torch.equal(loss, model(ids, labels=ids).loss)


def test_kosmos2_cross_attention_with_encoder_decoder_cache():
    """The cross-attention sub-block runs unfused; the self-attention cache inside an
    EncoderDecoderCache is updated as transformers' own."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model, reference = _pair("kosmos2", add_cross_attention=True)
    ids, encoder = _ids(length=6), torch.randn(2, 5, 64)
    logits = []
    for m in (model, reference):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        first = m(ids[:, :5], encoder_hidden_states=encoder, past_key_values=cache, use_cache=True)
        step = m(ids[:, 5:], encoder_hidden_states=encoder, past_key_values=cache, use_cache=True)
        logits.append(torch.cat([first.logits, step.logits], dim=1))
    _close(*logits, what="cached logits")


def test_kosmos2_conditional_generation_patches_the_text_model_only():
    from transformers.models.kosmos2 import modeling_kosmos2 as modeling

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    text = _kosmos_text(transformers.Kosmos2TextConfig).to_dict()
    config = transformers.Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=4)
    torch.manual_seed(0)
    model = modeling.Kosmos2ForConditionalGeneration(config)
    reference = copy.deepcopy(model)
    mt.apply_magneto(model)
    vision_types = {type(m) for m in model.vision_model.modules()}
    assert vision_types == {type(m) for m in reference.vision_model.modules()}
    assert all(
        type(block).__name__.startswith("Magneto") for block in model.text_model.model.layers
    )
    ids = _ids(length=10)
    position_mask = torch.zeros_like(ids)
    position_mask[:, 1:5] = 1  # the 4 image tokens
    pixels = torch.randn(2, 3, 32, 32)
    inputs = dict(input_ids=ids, pixel_values=pixels, image_embeds_position_mask=position_mask)
    out, expected = model(**inputs, labels=ids), reference(**inputs, labels=ids)
    _close(out.logits, expected.logits, what="logits")
    out.loss.backward()
    expected.loss.backward()
    _check_grads(model, reference)


def test_quantised_bitnet_projections_stay_unfused(caplog):
    from transformers.integrations.bitnet import AutoBitLinear

    torch.manual_seed(0)
    model = _bitnet()
    attention = model.model.layers[0].self_attn
    quantised = AutoBitLinear(64, 64, bias=False, online_quant=True)
    quantised.weight.data.copy_(attention.q_proj.weight)
    attention.q_proj = quantised
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    assert "model.layers.0.self_attn.q_proj (AutoBitLinear)" in caplog.text
    ids = _ids()
    _close(model(ids).logits, reference(ids).logits, what="logits")


@pytest.mark.parametrize("order", ["peft_first", "magneto_first"])
def test_peft_lora_projections_fall_back(order):
    """LoRA layers are not plain nn.Linear: those projections run PEFT's forward on the norm
    module's output, the others stay fused, and LoRA trains as on the unpatched model."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0)
    torch.manual_seed(0)
    base = _llama()
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
    assert len(_patched_types(model)) == 3
    ids = _ids()
    out, expected = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    _close(out.logits, expected.logits, what="logits")
    out.loss.backward()
    expected.loss.backward()
    _check_grads(model, reference)
