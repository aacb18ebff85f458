"""apply_magneto(model, output_projection=...): the model's head (magneto/integrations/
transformers/_head.py). "dense", the default: ln_linear without a norm on the head's weight,
counted as a fused call by every family's test in test_integrations_transformers.py; here its
forms and fallbacks (a head that is not a plain nn.Linear stays transformers', named; a model
without a head; None restores transformers' head). "int8": per-row int8 weights and scales, run
by magneto_kernels.int8_head, against float64 of the int8 formula (the quantisation itself, and
the logits from the module's int8 weights, within twice torch's own same-dtype error); the
greedy tokens and per-position choices of a tiny BitNet against its dense head (not equal by
design: the counts are printed and bounded below); state_dict unchanged; off again; bad
inputs."""

import copy
import logging

import pytest
import torch
from harness import assert_close_to_reference, randn
from transformers_models import bitnet, close, ids, mt

from magneto.integrations.transformers import _head


def _float64_int8(weight: torch.Tensor):
    """The formula in float64: s_n = max|W_n| / 127 rounded to W's dtype, q = clamp(round(W /
    s), -127, 127); and where W / s sits within float32's rounding of a half (a tie the float32
    division may round either way)."""
    w = weight.double()
    scale = (w.abs().amax(dim=1) / 127).to(weight.dtype).double()
    ratio = w / scale[:, None]
    q = torch.round(ratio).clamp(-127, 127)
    tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-5 * ratio.abs().clamp(min=1)
    return q, scale, tie


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("rows", (1, 5))
def test_int8_head_against_float64(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    vocab, hidden = 300, 128
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(randn(vocab, hidden, dtype=dtype, mean=0.01, std=0.05, generator=gen))
    dense = copy.deepcopy(head)
    _head.quantize(head)
    q64, s64, tie = _float64_int8(dense.weight)
    assert torch.equal(head._magneto_int8_scale.double(), s64)
    off = head._magneto_int8.double() != q64
    assert not (off & ~tie).any() and ((head._magneto_int8.double() - q64).abs() <= 1).all()
    x = randn(2, rows, hidden, dtype=dtype, mean=0.5, std=1.0, generator=gen)
    with torch.no_grad():
        out = head(x)
        q = head._magneto_int8
        s = head._magneto_int8_scale
        ref64 = (x.double() @ q.double().T) * s.double()
        torch_same = torch.nn.functional.linear(x, q.to(dtype)) * s
    assert out.dtype == dtype and out.shape == (2, rows, vocab)
    assert_close_to_reference(out, ref64, torch_same, "int8 head logits")


def _pair(dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = bitnet(hidden_size=128, intermediate_size=256, vocab_size=512).to(dtype)
    return model, copy.deepcopy(model)


def test_greedy_tokens_against_the_dense_head():
    """A tiny random BitNet, bf16: the int8 head's greedy tokens against the dense head's over
    16 new tokens (how many agree before the first difference is printed), and, teacher-forced
    on one 64-token input, the positions whose argmax agrees: at least 90%."""
    model, dense = _pair()
    mt.apply_magneto(model, output_projection="int8")
    mt.apply_magneto(dense)
    assert type(model.lm_head) is _head.Int8OutputProjection
    tokens = ids(length=5)
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    torch.manual_seed(1)
    inputs = torch.randint(0, 512, (1, 64))
    with torch.no_grad():
        ours, theirs = model.generate(tokens, **settings), dense.generate(tokens, **settings)
        agree = (model(inputs).logits.argmax(-1) == dense(inputs).logits.argmax(-1)).sum()
    new = (ours[:, 5:] == theirs[:, 5:]).all(dim=0).long()
    prefix = int(new.cumprod(0).sum())
    print(f"int8 head: {prefix}/16 greedy tokens equal before the first difference;"
          f" {int(agree)}/64 teacher-forced positions agree")  # fmt: skip
    assert agree >= 0.9 * 64


def test_state_dict_unchanged_and_off_again():
    """int8, then the default (dense), then transformers' own head: the state dict stays
    transformers', and each form's logits are its own."""
    model, reference = _pair(torch.float32)
    mt.apply_magneto(model, output_projection="int8")
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    tokens = ids()
    with torch.no_grad():
        quantised = model(tokens).logits
        assert not torch.equal(quantised, reference(tokens).logits)  # the int8 head ran
        mt.apply_magneto(model)
        assert type(model.lm_head) is _head.DenseOutputProjection
        torch.testing.assert_close(model(tokens).logits, mt.apply_magneto(reference)(tokens).logits)
        mt.apply_magneto(model, output_projection=None)
        assert type(model.lm_head) is torch.nn.Linear
        assert not hasattr(model.lm_head, "_magneto_options")
        expected = mt.apply_magneto(copy.deepcopy(reference), output_projection=None)
        assert torch.equal(model(tokens).logits, expected(tokens).logits)


def test_dense_head_is_one_fused_call_with_transformers_logits_and_gradients(fused_calls):
    """The default head: one ln_linear a forward on the head's own weight (tied or not, as it
    was), logits and the weight's gradient as transformers' head gives them, bf16 within its
    rounding."""
    model, reference = _pair(torch.float32)
    mt.apply_magneto(model, output_projection=None)
    dense = mt.apply_magneto(copy.deepcopy(model))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert (dense.lm_head.weight is dense.model.embed_tokens.weight) == tied
    tokens = ids()
    fused_calls.count = 0
    with torch.no_grad():
        plain = model(tokens).logits
        calls = fused_calls.count
        close(dense(tokens).logits, plain, what="dense head logits")
    assert fused_calls.count - calls == calls + 1  # the layers' calls, and the head's
    for m in (model, dense):
        m(tokens, labels=tokens).loss.backward()
    close(dense.lm_head.weight.grad, model.lm_head.weight.grad, what="head weight gradient")
    for m in (model, dense):
        m.to(torch.bfloat16)
    with torch.no_grad():
        close(dense(tokens).logits.float(), model(tokens).logits.float(), rtol=2e-2,
              what="bf16 dense head logits")  # fmt: skip


def test_dense_head_leaves_other_heads_to_transformers(caplog):
    """A head that is not a plain nn.Linear (a subclass here, as a PEFT wrapper would be) runs
    as the model's own under the default, named in apply_magneto's warning; a model without a
    head takes the default and refuses int8."""

    class OwnHead(torch.nn.Linear):
        pass

    model, reference = _pair(torch.float32)
    for m in (model, reference):
        head = m.lm_head
        m.lm_head = OwnHead(head.in_features, head.out_features, bias=False)
        m.lm_head.weight = head.weight
    with caplog.at_level(logging.WARNING, logger=mt.__name__):
        mt.apply_magneto(model)
    assert type(model.lm_head) is OwnHead
    assert "output projection (OwnHead)" in caplog.text
    tokens = ids()
    with torch.no_grad():
        close(model(tokens).logits, mt.apply_magneto(reference)(tokens).logits, what="logits")
    base = copy.deepcopy(reference.model)  # BitNetModel: no output projection
    mt.apply_magneto(base)
    with pytest.raises(ValueError, match="has no output projection to quantise"):
        mt.apply_magneto(base, output_projection="int8")


def test_weight_edited_in_place_is_quantised_again():
    model, reference = _pair(torch.float32)
    mt.apply_magneto(model, output_projection="int8")
    expected = mt.apply_magneto(reference, output_projection="int8")
    with torch.no_grad():
        for m in (model, expected):
            m.lm_head.weight.mul_(-2)
        expected.lm_head._quantize()
        tokens = ids()
        torch.testing.assert_close(model(tokens).logits, expected(tokens).logits)


def test_bad_inputs():
    model, _ = _pair(torch.float32)
    with pytest.raises(ValueError, match="output_projection must be None, 'dense' or 'int8'"):
        mt.apply_magneto(model, output_projection="int4")
    mt.apply_magneto(model, output_projection="int8")
    with pytest.raises(TypeError, match="the int8 head runs in torch.float32"):
        model.lm_head(torch.randn(1, 128, dtype=torch.bfloat16))
