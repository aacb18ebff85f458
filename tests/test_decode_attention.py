"""The decoding step's attention over a handed-in cache, fused with the cache's copy
(``magneto::decode_attention``, csrc/cpu/decode_attention.cpp; ``kv_cache.attend_handed_in``):
the kernel against float64 attention and its rooms against torch.cat, on the ISA build
MAGNETO_CPU_ISA selects (the Makefile's instruction-set stages run the ``cpu`` tests here); the
layer's step on the fused path and with the fallback forced, against float64 and torchscale's
format; and the attention core's choice under torch.compile (no timing in the trace)."""

import math

import pytest
import torch
import torch.nn.functional as F

from magneto import attention_core, kv_cache
from tests.harness import assert_close_to_reference, randn

pytestmark = pytest.mark.skipif(
    not kv_cache._fused_kernel(), reason="the C++ extension (magneto_kernels._C) is not built"
)

B, H, D = 2, 3, 20  # head_dim not a multiple of any vector width


def _attention64(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def _inputs(rows, cached, dtype, heads=H, head_dim=D):
    """q as the layer hands it (a head view of (batch, rows, heads·head_dim)), a cache viewed
    out of a longer buffer (strided positions), non-zero means."""
    q = randn(B, rows, heads, head_dim, dtype=dtype, mean=0.4).transpose(1, 2)
    prev_k = randn(B, heads, cached + 5, head_dim, dtype=dtype, mean=-0.3)[:, :, :cached]
    prev_v = randn(B, heads, cached + 5, head_dim, dtype=dtype, mean=0.7)[:, :, :cached]
    k = randn(B, rows, heads, head_dim, dtype=dtype, mean=0.2).transpose(1, 2)
    v = randn(B, rows, heads, head_dim, dtype=dtype, mean=-0.5).transpose(1, 2)
    return q, prev_k, prev_v, k, v


@pytest.fixture
def poisoned():
    from magneto_kernels import _C

    _C._set_poison_outputs(True)
    yield
    _C._set_poison_outputs(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("cached", [1, 17, 256])
def test_cpu_kernel_matches_float64(dtype, rows, cached, poisoned):
    torch.manual_seed(rows * 1000 + cached)
    q, prev_k, prev_v, k, v = _inputs(rows, cached, dtype)
    rooms = [torch.full((B, H, cached + rows, D), float("nan"), dtype=dtype) for _ in range(2)]
    out = torch.ops.magneto.decode_attention(q, prev_k, prev_v, k, v, *rooms)
    keys, values = torch.cat([prev_k, k], 2), torch.cat([prev_v, v], 2)
    # the rooms hold the cache and the new positions exactly
    assert torch.equal(rooms[0], keys) and torch.equal(rooms[1], values)
    # PyTorch's own error in this dtype: SDPA's math backend over the concatenated cache
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        own = F.scaled_dot_product_attention(q, keys, values)
    assert_close_to_reference(out, _attention64(q, keys, values), own, "decode_attention")
    # the layer's (batch, rows, heads·head_dim) is a view of the output
    assert out.transpose(1, 2).is_contiguous()


def test_cpu_kernel_at_the_report_shape_and_one_wide_head(poisoned):
    # 12 heads of 64 (the report's decode step), and head_dim 1 (no vector at all)
    for heads, head_dim in ((12, 64), (2, 1)):
        q, prev_k, prev_v, k, v = _inputs(1, 33, torch.float32, heads, head_dim)
        rooms = [torch.empty(B, heads, 34, head_dim) for _ in range(2)]
        out = torch.ops.magneto.decode_attention(q, prev_k, prev_v, k, v, *rooms)
        keys, values = torch.cat([prev_k, k], 2), torch.cat([prev_v, v], 2)
        own = F.scaled_dot_product_attention(q, keys, values)
        assert_close_to_reference(out, _attention64(q, keys, values), own, f"{heads}x{head_dim}")


def test_cpu_kernel_refuses_what_it_cannot_take():
    q, prev_k, prev_v, k, v = _inputs(2, 5, torch.float32)
    rooms = [torch.empty(B, H, 7, D) for _ in range(2)]
    op = torch.ops.magneto.decode_attention
    with pytest.raises(RuntimeError, match="key_room must have shape"):
        op(q, prev_k, prev_v, k, v, torch.empty(B, H, 6, D), rooms[1])
    with pytest.raises(RuntimeError, match="prev_value must be a CPU tensor of q's dtype"):
        op(q, prev_k, prev_v.double(), k, v, *rooms)
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        op(q, prev_k, prev_v, k, v.transpose(2, 3).contiguous().transpose(2, 3), *rooms)
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16 or float16"):
        op(*(t.double() for t in (q, prev_k, prev_v, k, v)), *(r.double() for r in rooms))


# ---------------------------------------------------------------------------------- the layer


def _layer_and_cache(dtype, rows, cached):
    from magneto.attention import MultiheadAttention
    from tests.models import config

    torch.manual_seed(cached)
    cfg = config(48, 4, 96)  # head_dim 12
    layer = MultiheadAttention(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = randn(B, rows, 48, dtype=dtype, mean=0.3)
    prev = [randn(B, 4, cached, 12, dtype=dtype, mean=m) for m in (-0.2, 0.5)]
    return layer, x, prev


def _step(layer, x, prev, path):
    state = {"prev_key": prev[0], "prev_value": prev[1]}
    with attention_core.force_path(path), torch.no_grad():
        return layer(x, incremental_state=state)[0], state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_layer_step_on_the_fused_path_and_the_fallbacks(monkeypatch, dtype, rows):
    monkeypatch.delenv(attention_core.ENV_VAR, raising=False)
    layer, x, prev = _layer_and_cache(dtype, rows, 17)
    fused = []
    attend_handed_in = kv_cache.attend_handed_in

    def counted(*args):
        out = attend_handed_in(*args)
        fused.append(out is not None)
        return out

    monkeypatch.setattr(kv_cache, "attend_handed_in", counted)
    outs = {path: _step(layer, x, prev, path) for path in (None, *attention_core.PATHS)}
    # auto: fused; a pinned path: the unfused one
    assert fused == [True] + [False] * len(attention_core.PATHS)
    # float64: the same layer on float64 copies, the cache concatenated as torchscale does
    layer64 = _layer_and_cache(dtype, rows, 17)[0].double()
    ref, _ = _step(layer64, x.double(), [t.double() for t in prev], "math")
    for path, (out, state) in outs.items():
        # the handed-back cache holds every position, as torch.cat's
        assert torch.equal(state["prev_key"][:, :, :17], prev[0])
        assert state["prev_key"].shape[2] == 17 + rows
        assert_close_to_reference(out, ref, outs["math"][0], f"path {path}")
    # the fused step's cache is a room's: the next step extends it in place
    assert kv_cache._ROOMS.get(outs[None][1]["prev_key"]) is not None


def test_the_layer_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    monkeypatch.delenv(attention_core.ENV_VAR, raising=False)
    layer, x, prev = _layer_and_cache(torch.float32, 1, 9)
    calls = []
    monkeypatch.setattr(
        torch.ops.magneto, "decode_attention", lambda *a: calls.append(1), raising=False
    )
    state = {"prev_key": prev[0], "prev_value": prev[1]}
    with torch.no_grad():
        layer(x, incremental_state=state, key_padding_mask=torch.zeros(B, 10, dtype=torch.bool))
        layer(x, incremental_state=state)  # the cache is now a room's: extended in place
        layer(x, incremental_state={}, is_causal=True)  # no cache
    with torch.enable_grad():  # recording a gradient
        layer(x.requires_grad_(), incremental_state=dict(prev_key=prev[0], prev_value=prev[1]))
    assert calls == []


# ------------------------------------------------------------------------------ torch.compile


def test_the_path_choice_does_not_break_a_compiled_graph(monkeypatch):
    monkeypatch.delenv(attention_core.ENV_VAR, raising=False)
    monkeypatch.setattr(attention_core, "_chosen", {})
    measured = []
    monkeypatch.setattr(attention_core, "_measure", lambda *a: measured.append(1) or "math")
    q, k, v = (randn(1, 2, 1, 8) for _ in range(3))
    with torch.no_grad():
        explanation = torch._dynamo.explain(attention_core.attend)(q, k, v)
        assert explanation.graph_break_count == 0
        assert measured == []  # unmeasured: SDPA
        attention_core.attend(q, k, v)  # measured eagerly ...
        torch._dynamo.reset()
        compiled = torch.compile(attention_core.attend, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(q, k, v), attention_core._math(q, k, v, None, False, 0))
    assert measured == [1]  # ... and the trace takes that choice without measuring again
