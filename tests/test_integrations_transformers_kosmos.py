"""magneto.integrations.transformers, Kosmos-2 and Kosmos-2.5 only: dropout (fused, from torch's
seed), the unfused cross-attention with an encoder-decoder cache, and the multimodal model whose
text decoder alone is patched. Shared helpers: tests/transformers_models.py."""

import copy

import pytest
import torch
from transformers_models import (
    BUILD,
    FUSED_PER_LAYER,
    HEAD,
    LAYERS,
    check_grads,
    close,
    ids,
    kosmos_text_config,
    mt,
    pair,
    transformers,
)


@pytest.mark.parametrize("family", ["kosmos2", "kosmos2_5"])
def test_dropout_reproducible_from_the_seed(family):
    torch.manual_seed(0)
    model = mt.apply_magneto(BUILD[family](dropout=0.2, activation_dropout=0.1))
    model.train()
    tokens = ids()

    def loss_and_grads(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (loss, grads), (again, grads_again) = loss_and_grads(3), loss_and_grads(3)
    assert torch.equal(loss, again)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    assert not torch.equal(loss, loss_and_grads(4)[0])
    model.eval()
    with torch.no_grad():
        assert not torch.equal(loss, model(tokens, labels=tokens).loss)


def test_kosmos2_cross_attention_with_encoder_decoder_cache(fused_calls):
    """The cross-attention sub-block runs unfused; the self-attention cache inside an
    EncoderDecoderCache is updated as transformers' own."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model, reference = pair("kosmos2", add_cross_attention=True)
    tokens, encoder = ids(length=6), torch.randn(2, 5, 64)
    logits = []
    for m in (model, reference):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        settings = dict(encoder_hidden_states=encoder, past_key_values=cache, use_cache=True)
        first, step = m(tokens[:, :5], **settings), m(tokens[:, 5:], **settings)
        logits.append(torch.cat([first.logits, step.logits], dim=1))
    assert fused_calls.count > 0
    close(*logits, what="cached logits")


def test_kosmos2_conditional_generation_patches_the_text_model_only(fused_calls):
    from transformers.models.kosmos2 import modeling_kosmos2 as modeling

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    text = kosmos_text_config(transformers.Kosmos2TextConfig).to_dict()
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
    tokens = ids(length=10)
    position_mask = torch.zeros_like(tokens)
    position_mask[:, 1:5] = 1  # the 4 image tokens
    pixels = torch.randn(2, 3, 32, 32)
    inputs = dict(input_ids=tokens, pixel_values=pixels, image_embeds_position_mask=position_mask)
    out, expected = model(**inputs, labels=tokens), reference(**inputs, labels=tokens)
    assert fused_calls.count == LAYERS * FUSED_PER_LAYER["kosmos2"] + HEAD
    close(out.logits, expected.logits, what="logits")
    out.loss.backward()
    expected.loss.backward()
    check_grads(model, reference)
