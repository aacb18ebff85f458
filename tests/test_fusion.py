"""What magneto's own modules fuse, and what they do with modules they cannot fuse.

- The fused-call counts: each layer makes exactly the op calls docs/design.md (The model) lists.
- What wraps or replaces a projection or a norm runs as a module (magneto.fusion), with one
  UnfusedWarning naming it, and gives the result the module gives: PEFT LoRA (adapter
  gradients against LoRA written as a parametrization, which stays fused; merge_and_unload),
  hooks (on sublayers: what torch.nn's hooks see), replacement classes. Parametrizations stay
  fused and act.
- The toolbox: swapped norms (torch's LayerNorm and RMSNorm fused, others run), swapped
  projections, pruning then training, dynamic quantisation, torch.ao observers, strided inputs.
"""

import collections
import copy
import warnings

import models
import pytest
import torch
from harness import RTOL, assert_close, randn
from models import perturb
from peft import LoraConfig, get_peft_model
from test_masks import torch_twins
from torch import nn
from torch.nn.utils import parametrize, prune

import magneto
import magneto_kernels
from magneto.fusion import UnfusedWarning

D, HEADS, FFN = 16, 4, 24


def _config(**overrides):
    layers = dict(encoder_layers=2, decoder_layers=2)
    return models.config(D, HEADS, FFN, overrides, **layers, positions="none", backend="reference")


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of each public op the modules make."""
    calls = collections.Counter()
    for name in ("ln_linear", "add_layer_norm", "layer_norm", "activation", "dropout"):
        op = getattr(magneto_kernels, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(magneto_kernels, name, counted)
    return calls


# (scheme, ln_linear calls, add_layer_norm calls) of one layer: q/k/v packed in one GEMM, the
# norms inside the projections and the residual adds inside the last ones (Pre-LN, Sub-LN), or
# one add_layer_norm per residual (Post-LN, DeepNorm).
ENCODER_LAYER = {"subln": (4, 0), "pre": (4, 0), "post": (4, 2), "deepnorm": (4, 2)}
DECODER_LAYER = {"subln": (7, 0), "pre": (7, 0), "post": (7, 3), "deepnorm": (7, 3)}


@pytest.mark.parametrize("scheme", ENCODER_LAYER)
def test_encoder_layer_fused_calls(scheme, op_calls):
    layer = magneto.EncoderLayer(_config(norm_scheme=scheme, dropout=0.1)).train()
    layer(torch.randn(2, 5, D))
    ln_linear, add_layer_norm = ENCODER_LAYER[scheme]
    assert op_calls == collections.Counter(ln_linear=ln_linear, add_layer_norm=add_layer_norm)


@pytest.mark.parametrize("scheme", DECODER_LAYER)
def test_decoder_layer_fused_calls(scheme, op_calls):
    """Cross-attention: q from the decoder stream, k and v of the encoder output in one GEMM."""
    layer = magneto.DecoderLayer(_config(norm_scheme=scheme), is_encoder_decoder=True).eval()
    layer(torch.randn(2, 5, D), torch.randn(2, 6, D), self_attn_causal=True)
    ln_linear, add_layer_norm = DECODER_LAYER[scheme]
    assert op_calls == collections.Counter(ln_linear=ln_linear, add_layer_norm=add_layer_norm)


# torchscale's options: the same calls as the plain layer (rel-pos bias inside SDPA's mask, xPos
# on q and k between the projections, a multiway decoder's copy A), or an MoE layer's: the
# gate's projection and each expert's fc1 and fc2 in place of fc1 and fc2, the layer's norm
# fused into the gate and every fc1, the residual added in the combine.
EXPERTS = 3
OPTION_LAYERS = {
    "xpos": dict(xpos_rel_pos=True),
    "rel_pos": dict(rel_pos_buckets=8, max_rel_pos=16),
    "multiway": dict(multiway=True),
    "moe": dict(moe_freq=1, moe_expert_count=EXPERTS),
}


@pytest.mark.parametrize("scheme", ENCODER_LAYER)
@pytest.mark.parametrize("option", OPTION_LAYERS)
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_option_layer_fused_calls(kind, option, scheme, op_calls):
    config = _config(norm_scheme=scheme, **OPTION_LAYERS[option])
    x, encoder_out = torch.randn(2, 5, D), torch.randn(2, 6, D)
    rel_pos = torch.randn(1, HEADS, 5, 5) if option == "rel_pos" else None
    if kind == "encoder":
        layer = magneto.EncoderLayer(config).eval()
        layer(x, rel_pos=rel_pos, multiway_split_position=2 if option == "multiway" else None)
        ln_linear, add_layer_norm = ENCODER_LAYER[scheme]
        if option == "multiway":  # every fused op once per part
            ln_linear, add_layer_norm = 2 * ln_linear, 2 * add_layer_norm
    else:
        layer = magneto.DecoderLayer(config, is_encoder_decoder=True).eval()
        layer(x, encoder_out, self_attn_rel_pos=rel_pos, self_attn_causal=True)
        ln_linear, add_layer_norm = DECODER_LAYER[scheme]
    if option == "moe":
        ln_linear += 1 + 2 * EXPERTS - 2
    assert op_calls == collections.Counter(ln_linear=ln_linear, add_layer_norm=add_layer_norm)


@pytest.mark.parametrize("scheme", ENCODER_LAYER)
def test_layernorm_embedding_is_one_norm_call(scheme, op_calls):
    """The embedding norm's output is the residual stream: one layer_norm of its own."""
    config = _config(norm_scheme=scheme, layernorm_embedding=True, encoder_layers=1)
    magneto.Encoder(config).eval()(None, token_embeddings=torch.randn(2, 5, D))
    ln_linear, add_layer_norm = ENCODER_LAYER[scheme]
    final = 1 if scheme in ("subln", "pre") else 0  # the final norm, no output projection
    expected = dict(ln_linear=ln_linear, add_layer_norm=add_layer_norm, layer_norm=1 + final)
    assert op_calls == collections.Counter({k: v for k, v in expected.items() if v})


def test_stack_fuses_the_final_norm_into_the_output_projection(op_calls):
    decoder = magneto.Decoder(_config(vocab_size=30)).eval()
    decoder(torch.randint(0, 30, (2, 5)))
    assert op_calls == collections.Counter(ln_linear=2 * 4 + 1)


def test_multiway_split_fused_calls(op_calls):
    """A split sequence: every projection once per part, attention over both."""
    layer = magneto.EncoderLayer(_config(multiway=True)).eval()
    layer(torch.randn(2, 7, D), multiway_split_position=3)
    assert op_calls == collections.Counter(ln_linear=2 * 4)


def test_activation_dropout_runs_fc2_unfused_as_documented(op_calls):
    ffn = magneto.FeedForward(_config(activation_dropout=0.2)).train()
    ffn(torch.randn(2, 5, D))
    assert op_calls == collections.Counter(ln_linear=2, activation=1, dropout=1)


# ---------------------------------------------------------------------------------------------
# Wrapped, hooked and replaced modules


def _unfused_warnings(run):
    """``run()``'s result and the UnfusedWarning messages it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run()
    return out, [str(w.message) for w in caught if issubclass(w.category, UnfusedWarning)]


class _LowRank(nn.Module):
    """LoRA as a parametrization, ``W + (B @ A)·scaling``: fused, since it acts through
    ``.weight``; the twin PEFT's adapters are checked against."""

    def __init__(self, a, b, scaling):
        super().__init__()
        self.a = nn.Parameter(a.detach().clone())
        self.b = nn.Parameter(b.detach().clone())
        self.scaling = scaling

    def forward(self, weight):
        return weight + (self.b @ self.a) * self.scaling


LORA_TARGETS = ["in_proj", "out_proj", "fc1", "fc2", "output_projection"]


def test_peft_lora_trains_and_merges():
    """PEFT LoRA on q/k/v (the packed ``in_proj``), out_proj, fc1, fc2 and the output
    projection of an encoder-decoder (self- and cross-attention): the adapted model runs the
    LoRA layers unfused, with one warning per adapted module; its output and the adapters'
    gradients equal those of LoRA written as parametrizations (fused); merge_and_unload gives
    the adapted output back, fully fused."""
    torch.manual_seed(0)
    config = _config(vocab_size=30, backend=None, encoder_layers=1, decoder_layers=1)
    model = perturb(magneto.EncoderDecoder(config)).eval()
    twin = copy.deepcopy(model)
    src, tgt = torch.randint(0, 30, (2, 6)), torch.randint(0, 30, (2, 5))
    base_out = model(src, tgt)[0]
    peft_model = get_peft_model(
        model, LoraConfig(target_modules=LORA_TARGETS, r=4, init_lora_weights=False)
    )
    adapters = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A"):
            low_rank = _LowRank(
                module.lora_A["default"].weight,
                module.lora_B["default"].weight,
                module.scaling["default"],
            )
            parametrize.register_parametrization(twin.get_submodule(name), "weight", low_rank)
            adapters[name] = (module, low_rank)
    assert len(adapters) == 4 + 6 + 1  # encoder layer, decoder layer, output projection

    out, warned = _unfused_warnings(lambda: peft_model(src, tgt)[0])
    assert len(warned) == len(adapters) and all("peft" in w for w in warned), warned
    assert not torch.allclose(out, base_out), "the adapters changed nothing"
    twin_out, twin_warned = _unfused_warnings(lambda: twin(src, tgt)[0])
    assert twin_warned == []
    assert_close(out, twin_out, RTOL[torch.float32])

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    (twin_out * g).sum().backward()
    for name, (module, low_rank) in adapters.items():
        for ours, theirs in (
            (module.lora_A["default"].weight, low_rank.a),
            (module.lora_B["default"].weight, low_rank.b),
        ):
            assert ours.grad is not None and ours.grad.abs().sum() > 0, name
            assert_close(ours.grad, theirs.grad, RTOL[torch.float32], name=name)

    merged = peft_model.merge_and_unload()
    merged_out, merged_warned = _unfused_warnings(lambda: merged(src, tgt)[0])
    assert merged_warned == []
    assert_close(merged_out, out, RTOL[torch.float32])


def test_hooks_on_sublayers_see_what_torch_nn_hooks_see():
    """Hooks on ``self_attn`` see its input (the normalised stream) and its output, not the
    residual sum; hooks on ``ffn`` see the block's FFN output: what torch.nn computes there."""
    theirs, ours = torch_twins("encoder")
    x = randn(2, 5, D, dtype=torch.float64, mean=0.5)
    seen = collections.defaultdict(list)

    def record(name):
        def hook(module, args, output):
            seen[name].append((args[0], output[0] if isinstance(output, tuple) else output))

        return hook

    theirs.self_attn.register_forward_hook(record("theirs"))
    ours.self_attn.register_forward_hook(record("ours"))
    ours.ffn.register_forward_hook(record("ours ffn"))
    want = theirs(x)
    out, warned = _unfused_warnings(lambda: ours(x))
    assert len(warned) == 2 and "self_attn" in warned[0] and "ffn" in warned[1], warned
    assert_close(out, want, RTOL[torch.float64], atol=1e-12)
    (their_in, their_out), (our_in, our_out) = seen["theirs"][0], seen["ours"][0]
    assert_close(our_in, their_in, RTOL[torch.float64], atol=1e-12, name="self_attn input")
    assert_close(our_out, their_out, RTOL[torch.float64], atol=1e-12, name="self_attn output")
    h = x + their_out
    ffn = theirs.linear2(theirs.activation(theirs.linear1(theirs.norm2(h))))
    assert_close(seen["ours ffn"][0][1], ffn, RTOL[torch.float64], atol=1e-12, name="ffn")


def test_hooks_on_projections_and_norms_fire_and_act():
    """A forward hook on any projection or norm fires once per call of the module (in_proj
    once for q, k and v) and its result is used; the layer's output is the fused one."""
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(backend=None))).eval()
    x = randn(2, 5, D, mean=0.3)
    fused = layer(x)[0]
    calls = collections.Counter()
    for name, module in layer.named_modules():
        if isinstance(module, (nn.Linear, magneto.NormLayer)):
            module.register_forward_hook(lambda m, a, o, name=name: calls.update([name]))
    out, warned = _unfused_warnings(lambda: layer(x)[0])
    assert calls == {name: 1 for name in calls} and len(calls) == 8, calls
    assert len(warned) == 8, warned
    assert_close(out, fused, RTOL[torch.float32])
    _, again = _unfused_warnings(lambda: layer(x)[0])
    assert again == [], "the warning is once per module"

    layer.ffn.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    with torch.no_grad():
        h = x + layer.self_attn(layer.self_attn_layer_norm(x))[0]
    with pytest.warns(UnfusedWarning, match="EncoderLayer.ffn has hooks"):
        out = layer(x)[0]
    assert_close(out, h, RTOL[torch.float32], name="a hook's result is used")


def test_hooks_on_a_split_multiway_sequence():
    """A multiway layer on a split sequence: a hook on self_attn sees the two parts, one on a
    copy of the FFN sees its part; the result is the unhooked one."""
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(backend=None, multiway=True))).eval()
    x = randn(2, 7, D, mean=0.3)
    want = layer(x, multiway_split_position=3)[0]
    seen = []
    layer.self_attn.register_forward_hook(lambda m, a, o: seen.append([t.shape for t in o[0]]))
    layer.ffn.B.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    out, warned = _unfused_warnings(lambda: layer(x, multiway_split_position=3)[0])
    assert seen == [[(2, 3, D), (2, 4, D)], (2, 4, D)] and len(warned) == 2
    assert_close(out, want, RTOL[torch.float32])


def test_global_module_hooks_unfuse_everything():
    """Global module hooks reach every module: self-attention, cross-attention and the FFN
    are called as torch.nn calls them, every projection and norm as a module."""
    torch.manual_seed(0)
    layer = magneto.DecoderLayer(_config(backend=None), is_encoder_decoder=True)
    layer = perturb(layer).eval()
    x, memory = randn(2, 5, D), randn(2, 6, D)
    fused = layer(x, memory, self_attn_causal=True)[0]
    called = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: called.append(m))
    try:
        out, warned = _unfused_warnings(lambda: layer(x, memory, self_attn_causal=True)[0])
    finally:
        handle.remove()
    assert layer.encoder_attn in called and layer.encoder_attn.in_proj in called
    assert any("DecoderLayer.encoder_attn has hooks" in w for w in warned), warned
    assert_close(out, fused, RTOL[torch.float32])


def test_hooks_on_a_multiway_copy():
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(backend=None, multiway=True))).eval()
    x = randn(2, 7, D, mean=0.3)
    want = layer(x, multiway_split_position=0)[0]
    layer.ffn.B.register_forward_hook(lambda m, a, o: None)
    with pytest.warns(UnfusedWarning, match="EncoderLayer.ffn.B has hooks"):
        out = layer(x, multiway_split_position=0)[0]
    assert_close(out, want, RTOL[torch.float32])


class _Double(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrizations_stay_fused_and_act(op_calls):
    """A parametrized projection is read through its parametrization by the fused op: the same
    op calls, no warning, and the result of the parametrized weight, gradients included."""
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config())).double().eval()
    twin = copy.deepcopy(layer)
    nn.utils.parametrizations.weight_norm(layer.self_attn.in_proj)
    parametrize.register_parametrization(layer.ffn.fc2, "weight", _Double())
    with torch.no_grad():
        twin.ffn.fc2.weight.mul_(2)
    x = randn(2, 5, D, dtype=torch.float64, mean=0.5)
    out, warned = _unfused_warnings(lambda: layer(x)[0])
    assert warned == []
    assert op_calls == collections.Counter(ln_linear=4)
    assert_close(out, twin(x)[0], RTOL[torch.float64], atol=1e-12)
    out.sum().backward()
    originals = layer.self_attn.in_proj.parametrizations.weight  # weight_norm's g and v
    for p in (originals.original0, originals.original1):
        assert p.grad is not None and p.grad.abs().sum() > 0


class _DoubledLinear(nn.Linear):
    """A replacement class with its own forward."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_replaced_projections_run_their_own_forward():
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config())).double().eval()
    twin = copy.deepcopy(layer)
    doubled = _DoubledLinear(FFN, D, dtype=torch.float64)
    doubled.load_state_dict(layer.ffn.fc2.state_dict())
    layer.ffn.fc2 = doubled
    with torch.no_grad():
        twin.ffn.fc2.weight.mul_(2)
        twin.ffn.fc2.bias.mul_(2)
    x = randn(2, 5, D, dtype=torch.float64, mean=0.5)
    out, warned = _unfused_warnings(lambda: layer(x)[0])
    assert len(warned) == 1 and "FeedForward.fc2" in warned[0] and "_DoubledLinear" in warned[0]
    assert_close(out, twin(x)[0], RTOL[torch.float64], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The toolbox


def _run_unfused(run):
    """``run()`` with a global (no-op) module hook: every module then runs as a module, which
    is the semantics a fused call must reproduce."""
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        return _unfused_warnings(run)[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("scheme", ["subln", "post"])
def test_torch_norms_swapped_in_stay_fused(scheme, op_calls):
    """nn.LayerNorm and nn.RMSNorm (its default eps: the dtype's epsilon) in place of
    magneto's norms: fused (the same op calls, no warning), with their own results."""
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(norm_scheme=scheme))).double().eval()
    layer.self_attn_layer_norm = perturb(nn.LayerNorm(D, eps=1e-3, dtype=torch.float64))
    layer.final_layer_norm = perturb(nn.RMSNorm(D, dtype=torch.float64), seed=1)
    x = randn(2, 5, D, dtype=torch.float64, mean=0.5)
    out, warned = _unfused_warnings(lambda: layer(x)[0])
    assert warned == []
    ln_linear, add_layer_norm = ENCODER_LAYER[scheme]
    assert op_calls == collections.Counter(ln_linear=ln_linear, add_layer_norm=add_layer_norm)
    assert_close(out, _run_unfused(lambda: layer(x)[0]), RTOL[torch.float64], atol=1e-12)


@pytest.mark.parametrize("scheme", ["subln", "post"])
def test_other_norms_and_projections_swapped_in_run_as_modules(scheme):
    """A norm the ops cannot express (no affine weight, nn.Identity) and a projection that is
    not a Linear (an nn.Sequential) run as modules, each with a warning naming it."""
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(norm_scheme=scheme))).double().eval()
    twin = copy.deepcopy(layer)
    layer.ffn.fc1 = nn.Sequential(layer.ffn.fc1)
    layer.self_attn_layer_norm = nn.LayerNorm(D, elementwise_affine=False, dtype=torch.float64)
    layer.final_layer_norm = nn.Identity()
    x = randn(2, 5, D, dtype=torch.float64, mean=0.5)
    out, warned = _unfused_warnings(lambda: layer(x)[0])
    assert any("FeedForward.fc1 is a torch.nn.modules.container.Sequential" in w for w in warned)
    assert any("LayerNorm" in w for w in warned) and any("Identity" in w for w in warned)
    with torch.no_grad():  # the same layer written out with the swapped modules
        twin.self_attn_layer_norm.weight.fill_(1.0)
        twin.self_attn_layer_norm.bias.zero_()
    if scheme == "subln":
        h = x + twin.self_attn(twin.self_attn_layer_norm(x))[0]
        want = h + twin.ffn(h)
    else:
        h = twin.self_attn_layer_norm(x + twin.self_attn(x)[0])
        want = h + twin.ffn(h)
    assert_close(out, want, RTOL[torch.float64], atol=1e-12)


def test_pruned_projection_trains():
    """torch.nn.utils.prune (a forward pre-hook recomputing the weight): the pruned weight is
    what runs, and training keeps the pruned entries at zero."""
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(backend=None))).train()
    twin = copy.deepcopy(layer)
    fc1 = layer.ffn.fc1
    prune.l1_unstructured(fc1, "weight", amount=0.5)
    with torch.no_grad():
        twin.ffn.fc1.weight.mul_(fc1.weight_mask)
    x = randn(2, 5, D, mean=0.3)
    with pytest.warns(UnfusedWarning, match="FeedForward.fc1 has hooks"):
        out = layer(x)[0]
    assert_close(out, twin(x)[0], RTOL[torch.float32])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        # a mean, not a sum: the sum's steps diverge to NaN by the third, where a last-bit
        # change of any kernel decides whether the pruned gradients read NaN or 0
        layer(x)[0].square().mean().backward()
        pruned = fc1.weight_mask == 0
        assert (fc1.weight_orig.grad[pruned] == 0).all() and fc1.weight_orig.grad.abs().sum() > 0
        optimizer.step()
    layer(x)
    assert (fc1.weight[fc1.weight_mask == 0] == 0).all()


def test_dynamic_quantization_runs_the_quantized_modules():
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    model = perturb(magneto.Encoder(_config(backend=None, vocab_size=30))).eval()
    tokens = torch.randint(0, 30, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao is deprecated upstream
        warnings.simplefilter("ignore", UserWarning)
        quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    linears = [m for m in quantized.modules() if type(m) is nn.Linear]
    assert linears == [], "every Linear quantized"
    with torch.no_grad():
        want = model(tokens)["encoder_out"]
        got, warned = _unfused_warnings(lambda: quantized(tokens)["encoder_out"])
    assert any("FeedForward.fc2 is a torch.ao" in w for w in warned), warned
    assert not torch.equal(got, want), "the quantized weights ran"
    assert_close(got, want, 0.05)


def test_torch_ao_observers_see_the_projections():
    """torch.ao.quantization.prepare attaches observers as forward hooks: they fire through
    the unfused path and record what the projection produced."""
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(backend=None))).eval()
    twin = copy.deepcopy(layer)
    layer.qconfig = torch.ao.quantization.default_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.ao.quantization.prepare(layer, inplace=True)
    produced = []
    layer.ffn.fc1.register_forward_hook(lambda m, a, o: produced.append(o))
    x = randn(2, 5, D, mean=0.3)
    out, warned = _unfused_warnings(lambda: layer(x)[0])
    assert warned
    observer = layer.ffn.fc1.activation_post_process
    assert observer.min_val == produced[0].min() and observer.max_val == produced[0].max()
    assert_close(out, twin(x)[0], RTOL[torch.float32])


def test_strided_inputs():
    torch.manual_seed(0)
    encoder = perturb(magneto.Encoder(_config(backend=None))).eval()
    wide = randn(2, 10, D, mean=0.3)
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    out = encoder(None, token_embeddings=strided)["encoder_out"]
    assert torch.equal(out, encoder(None, token_embeddings=strided.contiguous())["encoder_out"])
