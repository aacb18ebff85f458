"""magneto.integrations.transformers: patched transformers models match the unpatched ones.

Every family (tests/transformers_models.py): logits and every parameter gradient against a deep
copy taken before patching, with the number of fused calls counted (a patch that silently fuses
nothing fails); greedy generation token for token; what keeps working around the patch (state
dict, checkpoints, gradient checkpointing, output recording, caches, padding, torch.compile,
training); that transformers itself is left as it was; the admitted transformers versions.
Kosmos-only behaviour: test_integrations_transformers_kosmos.py; projections that run unfused:
test_integrations_transformers_fallbacks.py.
"""

import pickle

import pytest
import torch
from transformers_models import (
    BUILD,
    CONCAT_PER_LAYER,
    FAMILIES,
    FUSED_PER_LAYER,
    HEAD,
    LAYERS,
    VOCAB,
    check_grads,
    close,
    ids,
    mt,
    pair,
    patched_types,
    transformers,
)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match(family, attn, fused_calls):
    model, reference = pair(family, attn_implementation=attn)
    assert len(patched_types(model)) == 3
    assert list(model.state_dict()) == list(reference.state_dict())
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding in the second row
    out = model(tokens, attention_mask=mask, labels=tokens)
    assert fused_calls.count == LAYERS * FUSED_PER_LAYER[family] + HEAD
    assert fused_calls.concat == LAYERS * CONCAT_PER_LAYER[family]  # gate/up: no torch.cat
    expected = reference(tokens, attention_mask=mask, labels=tokens)
    close(out.logits, expected.logits, what="logits")
    out.loss.backward()
    expected.loss.backward()
    check_grads(model, reference)


@pytest.mark.parametrize("family", ["llama", "kosmos2"])
def test_bfloat16_within_its_rounding(family):
    """In bf16 the results differ from transformers' by rounding only (for Llama's RMSNorm, the
    one extra rounding of the normalised row before its weight multiplies it)."""
    model, reference = pair(family)
    model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    tokens = ids()
    out = model(tokens).logits.float()
    close(out, reference(tokens).logits.float(), rtol=2e-2, what="bf16 logits")


@pytest.mark.parametrize("length", [20, 40])  # 40 rows < 64 = hidden, 80 rows >= hidden
def test_grouped_projections_without_gradients_match(length, fused_calls):
    """gate/up and q/k/v are one ln_linear_group call each, with or without gradients, on both
    of its no-gradient paths (one call per weight below in_features rows, the weights taken as
    one from there on)."""
    model, reference = pair("llama")
    tokens = ids(batch=2, length=length)
    with torch.no_grad():
        close(model(tokens).logits, reference(tokens).logits, what="no-grad logits")
    assert fused_calls.count == LAYERS * 4 + HEAD


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_identical(family):
    model, reference = pair(family)
    tokens = ids(length=5)
    mask = torch.ones_like(tokens)
    tokens[1, :2], mask[1, :2] = 0, 0  # left padding
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    generated = model.generate(tokens, **settings)
    assert generated.shape[1] == 13
    assert torch.equal(generated, reference.generate(tokens, **settings))


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_and_hidden_states(family):
    model, reference = pair(family, attn_implementation="eager")
    tokens = ids()
    flags = dict(output_attentions=True, output_hidden_states=True)
    out, expected = model(tokens, **flags), reference(tokens, **flags)
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    assert len(out.attentions) == len(expected.attentions) == 2
    for a, b in zip(
        out.hidden_states + out.attentions, expected.hidden_states + expected.attentions
    ):
        close(a, b, what="recorded output")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_still_checkpoints(family):
    model, reference = pair(family)
    for m in (model, reference):
        m.gradient_checkpointing_enable()
        m.train()
    calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    tokens = ids()
    loss = model(tokens, labels=tokens).loss
    forward_calls = len(calls)
    loss.backward()
    assert forward_calls == 2
    assert len(calls) == 2 * forward_calls  # the backward recomputed every layer
    reference(tokens, labels=tokens).loss.backward()
    check_grads(model, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    """A patched model saves transformers' checkpoint: it loads unpatched, and patched again
    after apply_magneto on the loaded model."""
    model, reference = pair(family)
    tokens = ids()
    model.save_pretrained(tmp_path)
    loaded = type(reference).from_pretrained(tmp_path)
    assert not patched_types(loaded)
    close(loaded(tokens).logits, reference(tokens).logits, what="unpatched load")
    mt.apply_magneto(loaded)
    assert patched_types(loaded) == set(mt.replacements(family).values())
    close(loaded(tokens).logits, reference(tokens).logits, what="patched load")


def test_patching_twice_is_a_no_op_and_patched_models_pickle():
    model, reference = pair("llama")
    mt.apply_magneto(model)
    assert patched_types(model) == set(mt.replacements("llama").values())
    tokens = ids()
    close(model(tokens).logits, reference(tokens).logits, what="logits")
    unpickled = pickle.loads(pickle.dumps(model))
    assert patched_types(unpickled) == patched_types(model)
    close(unpickled(tokens).logits, reference(tokens).logits, what="unpickled logits")


def _transformers_state(family):
    """Every attribute of the family's modeling module, and every attribute of its classes."""
    modeling = next(iter(mt.replacements(family))).__module__
    module = __import__(modeling, fromlist=["_"])
    state = dict(vars(module))
    for name, value in vars(module).items():
        if isinstance(value, type):
            state.update({f"{name}.{k}": v for k, v in vars(value).items()})
    return state


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_is_left_as_it_was(family, fused_calls):
    """apply_magneto patches the instances of the model it is given, nothing global: the
    modeling module and its classes are unchanged, and a model of the family built afterwards
    is transformers' own, with the same results as one built before and no fused call."""
    torch.manual_seed(0)
    unpatched = BUILD[family]()
    before = _transformers_state(family)
    pair(family)
    after = _transformers_state(family)
    assert after.keys() == before.keys()
    assert [k for k in before if after[k] is not before[k]] == []
    torch.manual_seed(0)
    built_after = BUILD[family]()
    assert not patched_types(built_after)
    tokens = ids()
    fused_calls.count = 0
    assert torch.equal(built_after(tokens).logits, unpatched(tokens).logits)
    assert fused_calls.count == 0


def test_unsupported_model_type():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="llama.*bitnet.*kosmos"):
        mt.apply_magneto(transformers.GPT2LMHeadModel(config))


@pytest.mark.parametrize("version", ["5.18.0", "5.20.1", "5.23.0"])
def test_admitted_transformers_versions(version):
    mt.check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.17.0", "5.24.0", "5.24.0.dev0", "6.0.0", "4.57.6"])
def test_other_transformers_versions_are_refused(version, monkeypatch):
    """Outside TRANSFORMERS_RANGE apply_magneto raises before it touches the model."""
    with pytest.raises(RuntimeError, match="transformers>=5.18.0,<5.24, found"):
        mt.check_transformers_version(version)
    monkeypatch.setattr(transformers, "__version__", version)
    model = BUILD["llama"]()
    with pytest.raises(RuntimeError, match=f"found {version}"):
        mt.apply_magneto(model)
    assert not patched_types(model)


def test_the_installed_transformers_is_admitted():
    """The suite runs under an admitted release: CI runs it under both ends of the range."""
    mt.check_transformers_version(transformers.__version__)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_converges_alike(family):
    model, reference = pair(family)
    tokens = ids()
    losses = {}
    for name, m in (("patched", model), ("reference", reference)):
        m.train()
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = m(tokens, labels=tokens).loss
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
    close(trained, expected, rtol=1e-4, what="trained parameters")


@pytest.mark.parametrize("family", ["llama", "bitnet"])
def test_compile_fullgraph(family):
    """aot_eager traces forward and backward through the ops' fake kernels and autograd
    registrations in one graph, as inductor would, at a fraction of CPU compile time."""
    model, reference = pair(family)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    tokens = ids()
    out = compiled(tokens, labels=tokens)
    expected = reference(tokens, labels=tokens)
    close(out.logits, expected.logits, what="compiled logits")
    out.loss.backward()
    expected.loss.backward()
    check_grads(model, reference)
