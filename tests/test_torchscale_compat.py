"""Drop-in parity with the real torchscale 0.3.0 package (fp32, relative error <= 1e-5).

torchscale imports ``timm.models.layers.drop_path``; real timm does not install beside the CPU
torch, so conftest.py puts ``magneto/compat/timm_standin`` (a labelled stand-in providing that one
function) on ``sys.path`` when no timm is importable.
"""

import models
import pytest
import torch
from models import perturb, rel_err
from torchscale.architecture.decoder import Decoder as TSDecoder
from torchscale.architecture.encoder import Encoder as TSEncoder
from torchscale.architecture.encoder_decoder import EncoderDecoder as TSEncoderDecoder
from torchscale.component.embedding import PositionalEmbedding, TextEmbedding

import magneto
import magneto_kernels
from magneto.compat.torchscale import (
    config_from_torchscale,
    from_torchscale,
    to_torchscale,
    to_torchscale_state_dict,
)

TOL = 1e-5


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests check the modules on the pure-PyTorch reference ops (the kernels have
    their own tests); pinned per test so an installed C++/Triton backend does not take over."""
    monkeypatch.setenv(magneto_kernels.ENV_VAR, "reference")


D, HEADS, FFN, VOCAB, PAD = 32, 4, 48, 40, 1
SCHEMES = {
    "subln": {},
    "deepnorm": {"deepnorm": True},
    "pre": {"subln": False},
    "post": {"subln": False, "encoder_normalize_before": False, "decoder_normalize_before": False},
}


def _args(kind, scheme, **extra):
    flags = dict(SCHEMES[scheme], vocab_size=VOCAB, **extra)
    if kind != "encoder_decoder":  # a one-sided config has no field for the other side
        other = "decoder" if kind == "encoder" else "encoder"
        flags.pop(f"{other}_normalize_before", None)
    return models.torchscale_config(kind, D, HEADS, FFN, (3, 2), **flags)


def _ts_model(kind, scheme, seed=0, **extra):
    torch.manual_seed(seed)
    args = _args(kind, scheme, **extra)
    embed = lambda: TextEmbedding(VOCAB, D, padding_idx=PAD)  # noqa: E731
    positions = lambda: PositionalEmbedding(64, D)  # noqa: E731
    if kind == "encoder":
        model = TSEncoder(args, embed(), positions())
    elif kind == "decoder":
        model = TSDecoder(args, embed(), positions())
    else:
        model = TSEncoderDecoder(args, embed(), positions(), embed(), positions())
    return perturb(model, seed).eval()


def _tokens(batch=3, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[1, length - 3 :] = True
    pad[2, length - 1 :] = True
    tokens[pad] = PAD
    return tokens, pad


def _compare(ours, theirs, what, errors):
    """Same structure and values (relative error <= TOL); records the error."""
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), what
        for key in theirs:
            _compare(ours[key], theirs[key], f"{what}[{key!r}]", errors)
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), what
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _compare(a, b, f"{what}[{i}]", errors)
    elif isinstance(theirs, torch.Tensor):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
        if theirs.dtype == torch.bool:
            assert torch.equal(ours, theirs), what
        else:
            errors[what] = rel_err(ours, theirs)
            assert errors[what] <= TOL, f"{what}: relative error {errors[what]:.2e}"
    else:
        assert ours == theirs, what


def _compare_grads(ours, theirs, errors):
    theirs_g = {n: p.grad for n, p in theirs.named_parameters()}
    ours_g = to_torchscale_state_dict({n: p.grad for n, p in ours.named_parameters()})
    assert ours_g.keys() == theirs_g.keys()
    for name, grad in theirs_g.items():
        assert grad is not None and ours_g[name] is not None, name
        if name.endswith("k_proj.bias"):
            # Zero in exact arithmetic (a key bias shifts all of a query's scores equally):
            # both sides hold rounding noise only, tiny next to the key weight's gradient.
            scale = theirs_g[name[:-4] + "weight"].norm()
            assert ours_g[name].norm() <= TOL * scale and grad.norm() <= TOL * scale, name
            continue
        errors["grad " + name] = rel_err(ours_g[name], grad)
        assert errors["grad " + name] <= TOL, f"grad {name}: {errors['grad ' + name]:.2e}"


def _check_parity(ts, mg, call, what):
    """call(model) -> result on both models, then backward of a fixed random projection of the
    first tensor; the results and the gradients compared; returns the errors."""
    results = []
    for model in (ts, mg):
        out = call(model)
        main = out["encoder_out"] if isinstance(out, dict) else out[0]
        g = torch.Generator().manual_seed(5)
        (main * torch.randn(main.shape, generator=g)).sum().backward()
        results.append(out)
    errors = {}
    _compare(results[1], results[0], what, errors)
    _compare_grads(mg, ts, errors)
    return errors


ONE_STACK = {  # kind: magneto's class, the padding mask's argument, the tokens' seed
    "encoder": (magneto.Encoder, "encoder_padding_mask", 1),
    "decoder": (magneto.Decoder, "self_attn_padding_mask", 2),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("kind", list(ONE_STACK))
def test_one_stack_parity_with_padding(kind, scheme):
    cls, mask, seed = ONE_STACK[kind]
    ts = _ts_model(kind, scheme)
    mg = from_torchscale(ts)
    assert isinstance(mg, cls) and not mg.training
    tokens, pad = _tokens(seed=seed)
    _check_parity(ts, mg, lambda m: m(tokens, **{mask: pad}, return_all_hiddens=True), kind)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_encoder_decoder_parity(scheme):
    ts = _ts_model("encoder_decoder", scheme)
    mg = from_torchscale(ts)
    assert isinstance(mg, magneto.EncoderDecoder)
    src, pad = _tokens(seed=3)
    tgt, _ = _tokens(length=6, seed=4)
    errors = _check_parity(ts, mg, lambda m: m(src, tgt), "encoder_decoder")
    # cross-attention over a padded source
    run = lambda m: m.decoder(tgt, encoder_out=m.encoder(src, encoder_padding_mask=pad))  # noqa
    _compare(run(mg), run(ts), "padded source", errors)


def test_drop_path_training_parity():
    """In training, drop path draws the same per-sample masks from torch's generator."""
    ts = _ts_model("encoder", "subln", drop_path_rate=0.5).train()
    mg = from_torchscale(ts)
    assert mg.training
    tokens, pad = _tokens(batch=8)
    outs = []
    for model in (ts, mg):
        torch.manual_seed(9)
        outs.append(model(tokens, encoder_padding_mask=pad)["encoder_out"])
    _compare(outs[1], outs[0], "train", {})


@pytest.mark.parametrize("scheme", ["subln", "deepnorm"])
@pytest.mark.parametrize("first_step", [False, True])
def test_incremental_decoding_parity(scheme, first_step):
    ts = _ts_model("decoder", scheme)
    mg = from_torchscale(ts)
    tokens, _ = _tokens(length=7, seed=6)
    states, errors = ({"is_first_step": True} if first_step else {}, {})
    states = [dict(states), dict(states)]
    start = 4 if first_step else 1
    with torch.no_grad():
        for t in range(start, 8):
            steps = [
                model(tokens[:, :t], incremental_state=state)
                for model, state in zip((ts, mg), states)
            ]
            _compare(steps[1], steps[0], f"step {t}", errors)
            for state in states:
                state["is_first_step"] = False
        for layer in range(2):
            for key in ("prev_key", "prev_value"):
                _compare(states[1][layer][key], states[0][layer][key], f"{layer}.{key}", errors)
        full = ts(tokens)[0]
    _compare(steps[1][0], full[:, -1:], "last step vs full", errors)


def test_torchscale_state_dict_loads_directly():
    ts = _ts_model("encoder_decoder", "subln")
    config = config_from_torchscale(ts.args, "encoder_decoder").replace(
        init="paper", positions="learned", max_positions=62, padding_idx=PAD
    )
    mg = magneto.EncoderDecoder(config).eval()
    mg.load_state_dict(ts.state_dict())  # separate q/k/v entries -> packed parameters
    src, tgt = _tokens(seed=7)[0], _tokens(length=5, seed=8)[0]
    with torch.no_grad():
        _compare(mg(src, tgt), ts(src, tgt), "loaded", {})


@pytest.mark.parametrize("kind", ["encoder", "decoder", "encoder_decoder"])
def test_to_torchscale_round_trip(kind):
    torch.manual_seed(0)
    config = magneto.MagnetoConfig(
        embed_dim=D,
        num_heads=HEADS,
        ffn_dim=FFN,
        encoder_layers=2,
        decoder_layers=2,
        vocab_size=VOCAB,
        padding_idx=PAD,
        norm_scheme="deepnorm" if kind == "decoder" else "subln",
        max_positions=30,
        share_all_embeddings=kind == "encoder_decoder",
    )
    cls = {
        "encoder": magneto.Encoder,
        "decoder": magneto.Decoder,
        "encoder_decoder": magneto.EncoderDecoder,
    }[kind]
    mg = perturb(cls(config)).eval()
    ts = to_torchscale(mg)
    assert type(ts).__module__.startswith("torchscale")
    tokens = _tokens(seed=9)[0]
    with torch.no_grad():
        call = (
            (lambda m: m(tokens, tokens[:, :5]))
            if kind == "encoder_decoder"
            else (lambda m: m(tokens))
        )
        _compare(call(mg), call(ts), kind, {})
        if kind == "encoder_decoder":
            assert ts.decoder.embed_tokens is ts.encoder.embed_tokens
            assert ts.decoder.output_projection.weight is ts.decoder.embed_tokens.weight
        back = from_torchscale(ts)
        _compare(call(back), call(mg), "back", {})


@pytest.mark.parametrize(
    "option,value,refused",
    [
        ("moe_freq", 2, "moe_expert_count"),  # MoE layers without experts
        ("use_xmoe", True, "use_xmoe"),  # X-MoE routing without MoE layers
        ("moe_expert_count", 4, None),  # experts, but no MoE layer: as torchscale, none built
        ("rel_pos_buckets", 32, None),  # no max_rel_pos: torchscale builds no table either
    ],
)
def test_options_torchscale_cannot_build_are_refused(option, value, refused):
    """Options set on a built model's args (torchscale's configs refuse some of these, or
    build nothing from them): what torchscale could not have built is refused, naming the
    option; what it ignores converts to the same model."""
    ts = _ts_model("encoder", "subln")
    setattr(ts.args, option, value)
    if refused:
        with pytest.raises(ValueError, match=refused):
            from_torchscale(ts)
        return
    mg = from_torchscale(ts)
    assert mg.relative_position is None and all(layer.moe_layer is None for layer in mg.layers)
    tokens, pad = _tokens()
    with torch.no_grad():
        _compare(mg(tokens, encoder_padding_mask=pad), ts(tokens, encoder_padding_mask=pad), "", {})


def test_other_refusals_name_the_problem():
    args = _args("encoder_decoder", "subln")
    args.decoder_attention_heads = 8
    with pytest.raises(ValueError, match="decoder_attention_heads"):
        config_from_torchscale(args, "encoder_decoder")
    with pytest.raises(ValueError, match="torchscale Encoder, Decoder or EncoderDecoder"):
        from_torchscale(torch.nn.Linear(2, 2))
    config = magneto.MagnetoConfig(embed_dim=D, num_heads=HEADS, ffn_dim=FFN, encoder_layers=1)
    for change, name in (
        (dict(norm="rms"), "norm"),
        (dict(activation="gelu_tanh"), "gelu_tanh"),
        (dict(activation=torch.tanh), "takes a name only"),
        (dict(bias=False), "bias"),
    ):
        with pytest.raises(ValueError, match=name):
            to_torchscale(magneto.Encoder(config.replace(**change)))
    moe = magneto.Encoder(config.replace(moe_freq=1, moe_expert_count=2))
    with pytest.raises(ValueError, match="moe_freq=1: torchscale's MoE layers need torch.dist"):
        to_torchscale(moe)  # outside torch.distributed
