"""The attention core's paths (magneto/attention_core.py): each, forced, against a float64
evaluation of SDPA's definition with every mask kind; the measured choice; the models on each."""

import math

import pytest
import torch
import torch.nn.functional as F

from magneto import attention_core, masks
from magneto.attention_core import attend, force_path
from tests.harness import assert_close_to_reference, randn

B, H, D = 2, 3, 16


def _reference64(q, k, v, mask, causal):
    """SDPA's definition in float64; a row with every key masked gives 0."""
    q, k, v = q.double(), k.double(), v.double()
    mask = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    scores = masks.masked_scores(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), mask, causal)
    p = scores.softmax(-1).nan_to_num(0.0)
    return p @ v


def _mask(kind, tgt, src, dtype):
    if kind == "none" or kind == "causal":
        return None
    if kind == "bool":
        mask = torch.rand(tgt, src) > 0.3
        mask[:, 0] = True
        return mask
    if kind == "bool_empty_row":  # one query sees no key: SDPA gives 0 there
        mask = torch.rand(B, H, tgt, src) > 0.3
        mask[:, :, 0] = False
        mask[:, :, 1:, 0] = True
        return mask
    if kind == "float":  # an additive bias with finite values, per head
        return randn(B, H, tgt, src, dtype=dtype)
    if kind == "float_inf":  # a key padded out with -inf
        mask = torch.zeros(B, 1, 1, src, dtype=dtype)
        mask[..., -2:] = float("-inf")
        return mask
    raise AssertionError(kind)


@pytest.mark.parametrize("path", attention_core.PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "bool_empty_row", "float", "float_inf"])
@pytest.mark.parametrize("tgt,src", [(1, 9), (5, 5), (4, 11)])
def test_each_path_matches_float64(path, dtype, kind, tgt, src):
    torch.manual_seed(tgt * 100 + src)
    q = randn(B, H, tgt, D, dtype=dtype, mean=0.5)
    k = randn(B, H, src, D, dtype=dtype, mean=-0.3)
    v = randn(B, H, src, D, dtype=dtype, mean=1.0)
    mask, causal = _mask(kind, tgt, src, dtype), kind == "causal"
    ref = _reference64(q, k, v, mask, causal)
    # PyTorch's own error in this dtype: SDPA's math backend run on the dtype's inputs
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        own = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    own = own.nan_to_num(0.0)  # torch's math backend gives NaN where every key is masked
    with force_path(path):
        out = attend(q, k, v, mask, causal)
    assert_close_to_reference(out, ref, own, f"{path} attention")


@pytest.mark.parametrize("path", attention_core.PATHS)
def test_gradients_on_each_path(path):
    torch.manual_seed(0)
    q, k, v = (randn(B, H, 6, D, mean=0.2).requires_grad_() for _ in range(3))
    mask = _mask("float", 6, 6, torch.float32)
    with force_path(path):
        out = attend(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference64(q64, k64, v64, mask, False)
    refs = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    for name, g, r in zip("qkv", grads, refs):
        assert_close_to_reference(g, r, g.detach(), f"d{name}")


def test_math_path_applies_dropout():
    torch.manual_seed(0)
    q, k, v = (randn(B, H, 4, D) for _ in range(3))
    with force_path("math"):
        plain = attend(q, k, v)
        dropped = attend(q, k, v, dropout_p=0.5)
    assert not torch.equal(plain, dropped)


def test_the_choice_is_measured_once_per_key(monkeypatch):
    monkeypatch.delenv(attention_core.ENV_VAR, raising=False)
    monkeypatch.setattr(attention_core, "_chosen", {})
    measured = []

    def measure(q, k, v, mask, causal, paths, training):
        measured.append((q.shape, paths, training))
        return paths[-1]

    monkeypatch.setattr(attention_core, "_measure", measure)
    q, k, v = (randn(B, H, 1, D) for _ in range(3))
    with torch.no_grad():
        attend(q, k, v)
        attend(randn(B, H, 1, D), k, v)  # the same key: not measured again
        attend(randn(B, H, 2, D), k, v)  # query length 2: a new bucket
    assert [m[1:] for m in measured] == [(("sdpa", "math"), False)] * 2
    assert set(attention_core.chosen_paths().values()) == {"math"}
    # float32 recording a gradient, or with attention dropout: sdpa alone, nothing timed
    assert attention_core.path_for(q.requires_grad_(), k, v, None, False, 0.0) == "sdpa"
    with torch.no_grad():
        assert attention_core.path_for(q, k, v, None, False, 0.1) == "sdpa"
    assert len(measured) == 2
    # bf16: widened is a candidate, and a training call is measured forward and backward
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    with torch.no_grad():
        assert attention_core.path_for(qb, kb, vb, None, False, 0.0) == "math"
    assert attention_core.path_for(qb.requires_grad_(), kb, vb, None, False, 0.0) == "widened"
    assert [m[1:] for m in measured[2:]] == [
        (("sdpa", "widened", "math"), False),
        (("sdpa", "widened"), True),
    ]


def test_the_measurement_picks_the_faster_path(monkeypatch):
    import time

    def slow_sdpa(q, k, v, *rest):  # slow in q's own dtype only (widened: fast)
        if q.dtype != torch.float32 or slow_float32:
            time.sleep(0.002)
        return q + k + v

    monkeypatch.setattr(attention_core, "_sdpa", slow_sdpa)  # widened's SDPA
    monkeypatch.setitem(attention_core._PATH_FNS, "sdpa", slow_sdpa)
    slow_float32 = True
    q = randn(B, H, 1, D)
    assert attention_core._measure(q, q, q, None, False, ("sdpa", "math"), False) == "math"
    # training: forward and backward timed, on copies (nothing reaches the caller's tensors)
    slow_float32 = False
    qb = randn(B, H, 8, D, dtype=torch.bfloat16).requires_grad_()
    path = attention_core._measure(qb, qb, qb, None, True, ("sdpa", "widened"), True)
    assert path == "widened" and qb.grad is None


def test_a_dropout_call_under_no_grad_is_measured_forward_only(monkeypatch):
    """Attention dropout under torch.no_grad, q a leaf that requires a gradient: the paths are
    timed without a backward (none is recorded)."""
    monkeypatch.delenv(attention_core.ENV_VAR, raising=False)
    monkeypatch.setattr(attention_core, "_chosen", {})
    q = randn(B, H, 4, D, dtype=torch.bfloat16).requires_grad_()
    with torch.no_grad():
        assert attention_core.path_for(q, q, q, None, False, 0.1) in ("sdpa", "widened")


def test_the_measurement_saves_nothing_a_memory_profiler_counts(monkeypatch):
    """A training call's first use times its paths forward and backward on copies: what those
    save is not the call's (the report's memory section counts saved storages with hooks)."""
    from magneto.profiling import saved_tensor_bytes

    monkeypatch.delenv(attention_core.ENV_VAR, raising=False)
    monkeypatch.setattr(attention_core, "_chosen", {})
    q, k, v = (randn(B, H, 16, D, dtype=torch.bfloat16).requires_grad_() for _ in "qkv")
    first, _ = saved_tensor_bytes(lambda: attend(q, k, v, causal=True))  # measures
    assert len(attention_core.chosen_paths()) == 1
    again, _ = saved_tensor_bytes(lambda: attend(q, k, v, causal=True))
    assert first == again > 0


def test_pinning(monkeypatch):
    q = randn(B, H, 1, D)
    monkeypatch.setenv(attention_core.ENV_VAR, "math")
    assert attention_core.path_for(q, q, q, None, False, 0.0) == "math"
    with force_path("sdpa"):  # the context wins over the environment
        assert attention_core.path_for(q, q, q, None, False, 0.0) == "sdpa"
    monkeypatch.setenv(attention_core.ENV_VAR, "flash")
    with pytest.raises(ValueError, match="MAGNETO_ATTENTION must be one of"):
        attend(q, q, q)
    with pytest.raises(ValueError, match="attention path must be one of"):
        with force_path("flash"):
            pass


def test_a_decoder_decodes_alike_on_both_paths():
    import magneto
    from tests.models import config, perturb

    torch.manual_seed(0)
    cfg = config(32, 4, 64, decoder_layers=2, vocab_size=50, dropout=0.0)
    model = perturb(magneto.Decoder(cfg)).eval()
    prompt, outs = torch.randint(2, 50, (2, 7)), {}
    for path in attention_core.PATHS:
        with force_path(path), torch.no_grad():
            tokens, state, logits = prompt, {}, []
            for _ in range(4):  # prompt, then one token a step (torchscale's convention)
                step = model(tokens, incremental_state=state)[0][:, -1]
                logits.append(step)
                tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], dim=1)
            outs[path] = (tokens, torch.stack(logits))
    assert torch.equal(outs["math"][0], outs["sdpa"][0])
    torch.testing.assert_close(outs["math"][1], outs["sdpa"][1], rtol=1e-5, atol=1e-5)
