"""magneto modules against hand-written formulas, gradcheck, incremental decoding, bad input.

Everything runs on CPU on the pure-PyTorch reference backend of ``magneto_kernels``.
"""

import copy
import io
import math

import models
import pytest
import torch
import torch.nn.functional as F
from harness import RTOL, assert_close, randn

import magneto
import magneto_kernels
from magneto.compat.torchscale import to_torchscale_state_dict
from magneto_kernels import reference
from magneto_kernels.codes import ACTIVATION_ALIASES, ACTIVATIONS, canonical_activation

D, HEADS, FFN = 16, 4, 24


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests check the modules on the pure-PyTorch reference ops (the kernels have
    their own tests); pinned per test so an installed C++/Triton backend does not take over."""
    monkeypatch.setenv(magneto_kernels.ENV_VAR, "reference")


SCHEMES = ("subln", "pre", "post", "deepnorm")


def _config(**overrides):
    return models.config(
        D, HEADS, FFN, overrides, encoder_layers=3, decoder_layers=3, positions="none"
    )


@torch.no_grad()
def _randomize(module, seed=0):
    """Non-trivial parameters everywhere (norm weights around 1, biases non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        p.copy_(
            1.0 + 0.2 * noise
            if name.endswith("norm.weight") or "_ln.weight" in name or "layernorm.weight" in name
            else 0.3 * noise
        )
    return module


# ---------------------------------------------------------------------------------------------
# Hand-written reference formulas (float64), straight from the paper (docs/design.md, The model).


def draw_seed(x):
    """The dropout seed convention of magneto_kernels' ops, restated: one int64 from torch's
    generator on x's device, so that torch.manual_seed reproduces every mask."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)


def _norm(x, norm):
    if norm.norm == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _attention(mha, xq, xk, xv, keep=None):
    """softmax(q k^T / sqrt(dh) + mask) v per head, inner LN, out_proj. keep: True = attend."""
    w, b = mha.in_proj_weight, mha.in_proj_bias
    rows = [slice(i * D, (i + 1) * D) for i in range(3)]
    q, k, v = (t @ w[r].T + b[r] for r, t in zip(rows, (xq, xk, xv)))
    heads = lambda t: t.view(t.shape[0], t.shape[1], HEADS, D // HEADS).transpose(1, 2)  # noqa
    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // HEADS)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(-1)
    o = (probs @ heads(v)).transpose(1, 2).reshape(xq.shape)
    if mha.inner_attn_ln is not None:
        o = _norm(o, mha.inner_attn_ln)
    return o @ mha.out_proj.weight.T + mha.out_proj.bias, probs


def _ffn(ffn, x):
    act = {
        "gelu": F.gelu,
        "relu": F.relu,
        "silu": F.silu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    }[ffn.activation]
    a = act(x @ ffn.fc1.weight.T + ffn.fc1.bias)
    if ffn.ffn_layernorm is not None:
        a = _norm(a, ffn.ffn_layernorm)
    return a @ ffn.fc2.weight.T + ffn.fc2.bias


def _block(scheme, alpha, x, norm, f):
    if scheme in ("subln", "pre"):
        return alpha * x + f(_norm(x, norm))
    return _norm(alpha * x + f(x), norm)


def _encoder_layer_formula(layer, scheme, x, keep):
    x = _block(
        scheme,
        layer.alpha,
        x,
        layer.self_attn_layer_norm,
        lambda h: _attention(layer.self_attn, h, h, h, keep)[0],
    )
    return _block(scheme, layer.alpha, x, layer.final_layer_norm, lambda h: _ffn(layer.ffn, h))


def _decoder_layer_formula(layer, scheme, x, enc, enc_keep):
    t = x.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = _block(
        scheme,
        layer.alpha,
        x,
        layer.self_attn_layer_norm,
        lambda h: _attention(layer.self_attn, h, h, h, causal)[0],
    )
    x = _block(
        scheme,
        layer.alpha,
        x,
        layer.encoder_attn_layer_norm,
        lambda h: _attention(layer.encoder_attn, h, enc, enc, enc_keep)[0],
    )
    return _block(scheme, layer.alpha, x, layer.final_layer_norm, lambda h: _ffn(layer.ffn, h))


def _padding(batch, length, pad_from):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, pad_from:] = True
    return mask


@pytest.mark.parametrize(
    "scheme,norm,activation",
    [
        ("subln", "layer", "gelu"),
        ("subln", "rms", "silu"),
        ("pre", "layer", "relu"),
        ("post", "layer", "gelu_tanh"),
        ("deepnorm", "layer", "gelu"),
        ("deepnorm", "rms", "relu"),
    ],
)
def test_encoder_layer_matches_formula(scheme, norm, activation):
    config = _config(norm_scheme=scheme, norm=norm, activation=activation)
    layer = _randomize(magneto.EncoderLayer(config, depth=1).double().eval())
    x = randn(3, 7, D, dtype=torch.float64, mean=0.5)
    pad = _padding(3, 7, 4)
    out, l_aux = layer(x, encoder_padding_mask=pad)
    assert l_aux is None
    assert (scheme == "deepnorm") == (layer.alpha != 1.0)
    ref = _encoder_layer_formula(layer, scheme, x, ~pad[:, None, None, :])
    assert_close(out, ref, RTOL[torch.float64], atol=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decoder_layer_matches_formula(scheme):
    config = _config(norm_scheme=scheme)
    layer = magneto.DecoderLayer(config, depth=0, is_encoder_decoder=True)
    layer = _randomize(layer.double().eval())
    x, enc = randn(2, 5, D, dtype=torch.float64, mean=-0.3), randn(2, 6, D, dtype=torch.float64)
    pad = _padding(2, 6, 3)
    out = layer(x, enc, pad, self_attn_causal=True)[0]
    ref = _decoder_layer_formula(layer, scheme, x, enc, ~pad[:, None, None, :])
    assert_close(out, ref, RTOL[torch.float64], atol=1e-12)
    # torchscale's way of asking for causality: an additive -inf mask
    triu = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
    assert_close(layer(x, enc, pad, self_attn_mask=triu)[0], ref, RTOL[torch.float64], atol=1e-12)


def test_attention_three_inputs_and_weights_match_formula():
    mha = _randomize(magneto.MultiheadAttention(_config(), self_attention=True).double())
    q, k, v = (randn(2, n, D, dtype=torch.float64, mean=0.2) for n in (3, 4, 4))
    mask = torch.rand(3, 4) < 0.3
    mask[:, 0] = False
    out, weights = mha(q, k, v, attn_mask=mask, need_weights=True)
    ref, probs = _attention(mha, q, k, v, ~mask)
    assert_close(out, ref, RTOL[torch.float64], atol=1e-12)
    assert_close(weights, probs.transpose(0, 1), RTOL[torch.float64], atol=1e-12, name="weights")


def test_feedforward_dropout_paths_match_formula():
    """Fused path (output dropout in fc2's epilogue) and the activation-dropout fallback."""
    config = _config(dropout=0.3, activation_dropout=0.2)
    ffn = _randomize(magneto.FeedForward(config).double()).train()
    ln = _randomize(magneto.NormLayer(D), seed=1).double()
    x = randn(2, 5, D, dtype=torch.float64, mean=1.0)
    for activation_dropout in (0.2, 0.0):
        ffn.activation_dropout = activation_dropout
        torch.manual_seed(11)
        out = ffn(x, input_norm=ln, residual=x, alpha=1.5)
        torch.manual_seed(11)
        a = F.gelu(_norm(x, ln) @ ffn.fc1.weight.T + ffn.fc1.bias)
        if activation_dropout:
            a = reference.dropout(a, activation_dropout, draw_seed(a))
        y = _norm(a, ffn.ffn_layernorm) @ ffn.fc2.weight.T + ffn.fc2.bias
        ref = 1.5 * x + reference.dropout(y, 0.3, draw_seed(y))
        assert_close(
            out,
            ref,
            RTOL[torch.float64],
            atol=1e-12,
            name=f"activation_dropout={activation_dropout}",
        )
        assert (out == 1.5 * x).any(), "output dropout dropped nothing"


@pytest.mark.parametrize("scheme", ["subln", "deepnorm"])
def test_drop_path_matches_formula(scheme):
    config = _config(norm_scheme=scheme, drop_path=0.6, encoder_layers=2)
    layer = _randomize(magneto.EncoderLayer(config, depth=1).double()).train()
    assert layer.drop_path.p == pytest.approx(0.6)
    x = randn(8, 3, D, dtype=torch.float64, mean=0.5)
    torch.manual_seed(5)
    out = layer(x)[0]
    torch.manual_seed(5)
    keeps = []

    def dropped(y):
        keep = y.new_empty(y.shape[0], 1, 1).bernoulli_(0.4)
        keeps.append(keep)
        return y * keep / 0.4

    with torch.no_grad():
        layer.eval()  # the sublayers themselves draw nothing here (no dropout)
        x1 = _block_drop(
            scheme,
            layer,
            x,
            layer.self_attn_layer_norm,
            lambda h: _attention(layer.self_attn, h, h, h)[0],
            dropped,
        )
        ref = _block_drop(
            scheme, layer, x1, layer.final_layer_norm, lambda h: _ffn(layer.ffn, h), dropped
        )
    assert_close(out, ref, RTOL[torch.float64], atol=1e-12)
    assert all((k == 0).any() and (k != 0).any() for k in keeps), "both branches must occur"


def _block_drop(scheme, layer, x, norm, f, dropped):
    if scheme in ("subln", "pre"):
        return layer.alpha * x + dropped(f(_norm(x, norm)))
    return _norm(layer.alpha * x + dropped(f(x)), norm)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradcheck_two_layer_encoder(scheme):
    config = _config(embed_dim=8, num_heads=2, ffn_dim=12, encoder_layers=2, norm_scheme=scheme)
    model = _randomize(magneto.Encoder(config).double())
    names, params = zip(*model.named_parameters())
    x = randn(2, 3, 8, dtype=torch.float64, mean=0.4).requires_grad_()
    pad = _padding(2, 3, 2)

    def run(x, *values):
        out = torch.func.functional_call(
            model,
            dict(zip(names, values)),
            args=(None,),
            kwargs=dict(token_embeddings=x, encoder_padding_mask=pad),
        )
        return out["encoder_out"]

    assert torch.autograd.gradcheck(
        run, (x, *[p.detach().requires_grad_() for p in params]), fast_mode=True
    )


def test_gradcheck_two_layer_decoder_with_cross_attention():
    config = _config(embed_dim=8, num_heads=2, ffn_dim=12, encoder_layers=2, decoder_layers=2)
    model = _randomize(magneto.Decoder(config, is_encoder_decoder=True).double())
    names, params = zip(*model.named_parameters())
    x = randn(2, 3, 8, dtype=torch.float64, mean=-0.4).requires_grad_()
    enc = randn(2, 4, 8, dtype=torch.float64).requires_grad_()
    pad = _padding(2, 4, 3)

    def run(x, enc, *values):
        encoder_out = {"encoder_out": enc, "encoder_padding_mask": pad}
        return torch.func.functional_call(
            model,
            dict(zip(names, values)),
            args=(None,),
            kwargs=dict(token_embeddings=x, encoder_out=encoder_out),
        )[0]

    assert torch.autograd.gradcheck(
        run, (x, enc, *[p.detach().requires_grad_() for p in params]), fast_mode=True
    )


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["subln", "deepnorm"])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_incremental_decoding_equals_full_causal_decoding(scheme, positions):
    torch.manual_seed(0)
    config = _config(norm_scheme=scheme, positions=positions, vocab_size=30, padding_idx=1)
    model = _randomize(magneto.Decoder(config)).eval()
    tokens = torch.randint(2, 30, (3, 7))
    with torch.no_grad():
        full = model(tokens)[0]
        state = {}
        steps = [model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(7)]
        assert_close(torch.cat(steps, dim=1), full, RTOL[torch.float32])
        assert state[0]["prev_key"].shape == (3, HEADS, 7, D // HEADS)
        # prefix in one call (is_first_step), then token by token
        state = {"is_first_step": True}
        prefix = model(tokens[:, :4], incremental_state=state)[0]
        state["is_first_step"] = False
        rest = [model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(4, 7)]
        assert_close(torch.cat([prefix, *rest], dim=1), full, RTOL[torch.float32])


def _layer_caches(state):
    return [s for s in state.values() if isinstance(s, dict)]


def test_kv_cache_grows_in_place():
    """Decoding steps write their keys and values into room after the cache
    (kv_cache.KVRoom) instead of copying it: the storage stays put between steps, a view an
    earlier step returned keeps its values, a state copied at some step (dict by dict, or
    deep-copied) and decoded on separately stays right on every branch, and a cache reordered
    as torchscale's beam search does (index_select) is taken as given. Every step is checked
    against the full causal pass."""
    torch.manual_seed(0)
    model = _randomize(magneto.Decoder(_config(vocab_size=30, padding_idx=1))).eval()
    tokens = torch.randint(2, 30, (3, 9))
    other = torch.cat([tokens[:, :4], torch.randint(2, 30, (3, 5))], dim=1)

    def check(seq, state, t):
        step = model(seq[:, : t + 1], incremental_state=state)[0]
        assert_close(step[:, -1], model(seq[:, : t + 1])[0][:, -1], RTOL[torch.float32])

    with torch.no_grad():
        state = {}
        for t in range(4):
            check(tokens, state, t)
        storage = [c["prev_key"].untyped_storage().data_ptr() for c in _layer_caches(state)]
        kept = [(c["prev_key"], c["prev_key"].clone()) for c in _layer_caches(state)]
        branch = {i: dict(c) if isinstance(c, dict) else c for i, c in state.items()}
        copied = copy.deepcopy(state)
        for t in range(4, 9):
            check(tokens, state, t)
            check(other, branch, t)
            check(other, copied, t)
        after = [c["prev_key"].untyped_storage().data_ptr() for c in _layer_caches(state)]
        assert after == storage, "the cache was copied instead of extended in place"
        for view, values in kept:
            assert torch.equal(view, values)
        order = torch.tensor([2, 0, 1])
        for cache in _layer_caches(state):
            for name in ("prev_key", "prev_value"):
                cache[name] = cache[name].index_select(0, order)
        extended = torch.cat([tokens[order], torch.randint(2, 30, (3, 1))], dim=1)
        check(extended, state, 9)


def test_kv_cache_across_inference_mode():
    """A cache made under torch.inference_mode (inference tensors, which take in-place writes
    only inside it) continues under no_grad, and the other way round."""
    torch.manual_seed(0)
    model = _randomize(magneto.Decoder(_config(vocab_size=30, padding_idx=1))).eval()
    tokens = torch.randint(2, 30, (2, 6))
    with torch.no_grad():
        full = model(tokens)[0]
    for first, then in (
        (torch.inference_mode, torch.no_grad),
        (torch.no_grad, torch.inference_mode),
    ):
        state, steps = {}, []
        for t in range(6):
            with first() if t < 3 else then():
                steps.append(model(tokens[:, : t + 1], incremental_state=state)[0])
        assert_close(torch.cat(steps, dim=1), full, RTOL[torch.float32])


def test_kv_cache_is_copied_when_recording_a_graph():
    """With gradients the cache is concatenated as torchscale does (no in-place writes into
    tensors a backward may have saved): gradients through two decoding steps match the full
    pass's."""
    torch.manual_seed(0)
    model = _randomize(magneto.Decoder(_config(vocab_size=30, padding_idx=1))).eval()
    tokens = torch.randint(2, 30, (2, 2))
    state = {}
    steps = [model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(2)]
    weight = model.layers[0].self_attn.in_proj_weight
    (grad,) = torch.autograd.grad(torch.cat(steps, dim=1).square().sum(), weight)
    (want,) = torch.autograd.grad(model(tokens)[0].square().sum(), weight)
    assert_close(grad, want, RTOL[torch.float32])


def test_incremental_decoding_with_cross_attention(monkeypatch):
    """Step-by-step decoding matches the full pass, and each layer projects the encoder output
    to keys and values once, at the first step, not at every step."""
    torch.manual_seed(0)
    model = _randomize(magneto.EncoderDecoder(_config(vocab_size=30, positions="learned"))).eval()
    src, tgt = torch.randint(0, 30, (2, 5)), torch.randint(0, 30, (2, 6))
    pad = _padding(2, 5, 3)
    with torch.no_grad():
        full = model(src, tgt, encoder_padding_mask=pad)[0]
        encoder_out = model.encoder(src, encoder_padding_mask=pad)
        projections_of_encoder_out = []
        linear = magneto.attention.MultiheadAttention._linear

        def counting_linear(self, x, *args):
            if x is encoder_out["encoder_out"]:
                projections_of_encoder_out.append(self)
            return linear(self, x, *args)

        monkeypatch.setattr(magneto.attention.MultiheadAttention, "_linear", counting_linear)
        state = {}
        steps = [
            model.decoder(tgt[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0]
            for t in range(6)
        ]
    assert_close(torch.cat(steps, dim=1), full, RTOL[torch.float32])
    # one k/v GEMM (key is value) per layer, over all six steps
    assert len(projections_of_encoder_out) == len(model.decoder.layers)


def test_state_dict_round_trip():
    config = _config(vocab_size=30, positions="learned", padding_idx=0)
    torch.manual_seed(0)
    first = magneto.EncoderDecoder(config).eval()
    torch.manual_seed(1)
    second = magneto.EncoderDecoder(config).eval()
    src, tgt = torch.randint(0, 30, (2, 5)), torch.randint(0, 30, (2, 4))
    assert not torch.equal(first(src, tgt)[0], second(src, tgt)[0])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer))
    assert torch.equal(first(src, tgt)[0], second(src, tgt)[0])
    # torchscale layout (separate q/k/v) loads too, through the pre-hook
    torch.manual_seed(2)
    third = magneto.EncoderDecoder(config).eval()
    third.load_state_dict(to_torchscale_state_dict(first.state_dict()))
    assert torch.equal(first(src, tgt)[0], third(src, tgt)[0])


def test_state_dict_of_earlier_versions_loads():
    """Earlier magneto versions stored the packed q/k/v as ``in_proj_weight``/``in_proj_bias``
    (now the module ``in_proj``): their state dicts load through the pre-hook."""
    torch.manual_seed(0)
    first = magneto.Encoder(_config()).eval()
    old = {
        key.replace("in_proj.weight", "in_proj_weight").replace("in_proj.bias", "in_proj_bias"): t
        for key, t in first.state_dict().items()
    }
    assert "layers.0.self_attn.in_proj_weight" in old
    torch.manual_seed(1)
    second = magneto.Encoder(_config()).eval()
    second.load_state_dict(old)
    x = randn(2, 3, D)
    assert torch.equal(
        first(None, token_embeddings=x)["encoder_out"],
        second(None, token_embeddings=x)["encoder_out"],
    )


@pytest.mark.parametrize(
    "activation", [*ACTIVATIONS, *(a for a in ACTIVATION_ALIASES if a is not None)]
)
def test_config_accepts_the_ops_activations(activation):
    """MagnetoConfig validates against magneto_kernels.codes: every activation the ops take,
    aliases included, builds a model whose FFN applies it (relu2 = relu(x)²)."""
    ffn = _randomize(magneto.FeedForward(_config(activation=activation)).double())
    x = randn(2, 3, D, dtype=torch.float64, mean=0.3)
    preact = x @ ffn.fc1.weight.T + ffn.fc1.bias
    a = reference.apply_activation(preact, canonical_activation(activation))
    want = _norm(a, ffn.ffn_layernorm) @ ffn.fc2.weight.T + ffn.fc2.bias
    assert_close(ffn(x), want, RTOL[torch.float64], atol=1e-12)


def test_config_use_xmoe_forces_torchscales_two_options():
    config = _config(moe_freq=1, moe_expert_count=2, use_xmoe=True)
    assert config.moe_normalize_gate_prob_before_dropping is True
    assert config.moe_second_expert_policy == "random"
    top1 = _config(moe_freq=1, moe_expert_count=1, moe_top1_expert=True)  # one expert is enough
    assert [config.is_moe_layer(i) for i in range(4)] == [True] * 4
    every_third = top1.replace(moe_freq=3)
    assert [every_third.is_moe_layer(i) for i in range(6)] == [False, False, True] * 2


def test_checkpoint_activations_gives_the_same_gradients():
    config = _config(dropout=0.2, activation_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    plain = magneto.Encoder(config).train()
    checkpointed = magneto.Encoder(config.replace(checkpoint_activations=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = randn(2, 5, D, mean=0.3)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        out = model(None, token_embeddings=x)["encoder_out"]
        out.pow(2).sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, RTOL[torch.float32], name=name)


def test_sinusoidal_positions_formula():
    table = magneto.SinusoidalPositionalEmbedding(6, 10)(torch.zeros(1, 10, 6))[0]
    p, i = 7, 1
    assert table[p, i].item() == pytest.approx(math.sin(p * 10000 ** (-i / 2)), rel=1e-6)
    assert table[p, 3 + i].item() == pytest.approx(math.cos(p * 10000 ** (-i / 2)), rel=1e-6)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(embed_dim=10, num_heads=3), "embed_dim must be divisible by num_heads"),
        (dict(norm_scheme="sandwich"), "norm_scheme"),
        (dict(activation="tanh"), "activation"),
        (dict(norm="batch"), "norm"),
        (dict(init="kaiming"), "init"),
        (dict(positions="rotary"), "positions"),
        (dict(dropout=1.0), "dropout"),
        (dict(backend="tpu"), "backend"),
        (dict(num_heads=0), "num_heads"),
        (dict(rel_pos_buckets=32), "rel_pos_buckets=32, max_rel_pos=0: both > 0"),
        (dict(rel_pos_buckets=2, max_rel_pos=8), "rel_pos_buckets / max_rel_pos: num_buckets=2"),
        (dict(rel_pos_buckets=32, max_rel_pos=8), "max_distance=8 must exceed"),
        (dict(max_rel_pos=-1), "max_rel_pos"),
        (dict(layernorm_embedding=1), "layernorm_embedding"),
        (dict(xpos_rel_pos=True, embed_dim=12, num_heads=4), "xpos_rel_pos: .* head_dim"),
        (dict(xpos_scale_base=0), "xpos_scale_base"),
        (dict(moe_freq=1), "moe_expert_count must be >= 2 for top-2"),
        (dict(moe_freq=1, moe_expert_count=1), "moe_expert_count must be >= 2"),
        (dict(moe_freq=-1), "moe_freq"),
        (dict(moe_second_expert_policy="first"), "moe_second_expert_policy"),
        (dict(moe_eval_capacity_token_fraction="all"), "moe_eval_capacity_token_fraction"),
        (dict(use_xmoe=True), "use_xmoe needs mixture-of-experts layers"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _config(**kwargs)


def test_bad_inputs_name_the_argument():
    encoder = magneto.Encoder(_config()).eval()
    with pytest.raises(ValueError, match="token_embeddings.*embed_dim=16"):
        encoder(None, token_embeddings=torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="encoder_padding_mask.*\\(2, 3\\)"):
        encoder(
            None,
            token_embeddings=torch.randn(2, 3, D),
            encoder_padding_mask=torch.zeros(2, 4, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="src_tokens or token_embeddings"):
        encoder(None)
    mha = magneto.MultiheadAttention(_config())
    with pytest.raises(ValueError, match="query must have last dimension embed_dim=16"):
        mha(torch.randn(2, 3, D - 1))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        mha(torch.randn(2, 3, D), key_padding_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        mha(torch.randn(2, 3, D), attn_mask=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="rel_pos must have shape .*\\(8, 3, 3\\)"):
        mha(torch.randn(2, 3, D), rel_pos=torch.zeros(6, 3, 3))
    with pytest.raises(ValueError, match="rel_pos must have shape"):
        mha(torch.randn(2, 3, D), rel_pos=torch.zeros(1, 3, 3, 3))
    layer = magneto.DecoderLayer(_config())
    with pytest.raises(ValueError, match="x must be a \\(batch, length, embed_dim=16\\)"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="x must have last dimension embed_dim"):
        magneto.FeedForward(_config())(torch.randn(4, 8))
    decoder = magneto.Decoder(_config())
    with pytest.raises(ValueError, match="token_embeddings must be given"):
        decoder(torch.zeros(2, 3, dtype=torch.long))
