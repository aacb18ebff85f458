"""BEiT-3 parity with torchscale 0.3.0's ``torchscale.model.BEiT3`` (fp32, relative error
<= 1e-5, outputs and every gradient), state dicts in both directions, and input errors.

``python3 -m pytest -q -s tests/test_beit3.py -k parity`` prints the largest errors per case.
"""

import models
import pytest
import torch
from harness import require_backend
from models import perturb, rel_err
from torchscale.model.BEiT3 import BEiT3 as TSBEiT3

import magneto
import magneto_kernels
from magneto.compat.torchscale import (
    config_from_torchscale,
    from_torchscale,
    to_torchscale,
    to_torchscale_state_dict,
)

TOL = 1e-5
D, HEADS, FFN, VOCAB, IMG, PATCH, CHANS, TEXT = 32, 4, 48, 40, 16, 4, 3, 20


def _args(**extra):
    image = dict(img_size=IMG, patch_size=PATCH, in_chans=CHANS)
    fields = dict(multiway=True, vocab_size=VOCAB, max_source_positions=TEXT, **image)
    return models.torchscale_config("encoder", D, HEADS, FFN, 2, **{**fields, **extra})


def _ts_model(seed=0, **extra):
    torch.manual_seed(seed)
    return perturb(TSBEiT3(_args(**extra)), seed).eval()


def _inputs(case, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, CHANS, IMG, IMG, generator=g)
    text = torch.randint(0, VOCAB, (batch, 7), generator=g)
    pad = torch.zeros(batch, 7, dtype=torch.bool)
    pad[1, 4:] = True
    masked = torch.rand(batch, (IMG // PATCH) ** 2, generator=g) > 0.5
    return {
        "vision": dict(visual_tokens=images),
        "text_padded": dict(textual_tokens=text, text_padding_position=pad),
        "vision_text": dict(visual_tokens=images, textual_tokens=text, text_padding_position=pad),
        "vision_masked": dict(visual_tokens=images, vision_masked_position=masked),
        "vision_text_masked": dict(
            visual_tokens=images, textual_tokens=text, vision_masked_position=masked
        ),
    }[case]


def _compare_outputs(ours, theirs, errors):
    assert ours.keys() == theirs.keys()
    assert ours["multiway_split_position"] == theirs["multiway_split_position"]
    assert torch.equal(ours["encoder_padding_mask"].bool(), theirs["encoder_padding_mask"].bool())
    for key in ("encoder_out", "encoder_embedding"):
        errors[key] = rel_err(ours[key], theirs[key])
        assert errors[key] <= TOL, f"{key}: relative error {errors[key]:.2e}"


def _compare_grads(ours, theirs, errors):
    theirs_g = {n: p.grad for n, p in theirs.named_parameters()}
    ours_g = to_torchscale_state_dict(
        {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in ours.named_parameters()}
    )
    assert ours_g.keys() == theirs_g.keys()
    for name, grad in theirs_g.items():
        mine = ours_g[name]
        if grad is None:  # a part or token the case does not use
            assert not mine.any(), name
            continue
        key_bias = "k_proj" in name and name.endswith(".bias")
        scale = theirs_g[name[:-4] + "weight"].norm() if key_bias else None
        if key_bias and grad.norm() <= TOL * scale:
            # Zero in exact arithmetic when all keys use one copy (its key bias shifts all of a
            # query's scores equally): rounding noise only, tiny next to the weight's gradient.
            # With both parts in the sequence only the two copies' sum is zero.
            assert mine.norm() <= TOL * scale, name
            continue
        errors["grad " + name] = rel_err(mine, grad)
        assert errors["grad " + name] <= TOL, f"grad {name}: {errors['grad ' + name]:.2e}"


def _run(model, inputs):
    out = model(**inputs)
    g = torch.Generator().manual_seed(5)
    main = out["encoder_out"]
    (main * torch.randn(main.shape, generator=g)).sum().backward()
    return out


CASES = ["vision", "text_padded", "vision_text", "vision_masked", "vision_text_masked"]


def _parity(case, backend, monkeypatch, **extra):
    require_backend(backend)
    monkeypatch.setenv(magneto_kernels.ENV_VAR, backend)
    ts = _ts_model(**extra)
    mg = from_torchscale(ts)
    assert isinstance(mg, magneto.BEiT3) and not mg.training
    inputs = _inputs(case)
    theirs, ours = _run(ts, inputs), _run(mg, inputs)
    errors = {}
    _compare_outputs(ours, theirs, errors)
    _compare_grads(mg, ts, errors)
    worst = max(errors, key=errors.get)
    print(
        f"\n{case} on {backend}: output {errors['encoder_out']:.1e}, worst {worst} "
        f"{errors[worst]:.1e}"
    )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", CASES)
def test_parity(case, backend, monkeypatch):
    _parity(case, backend, monkeypatch)


def test_parity_triton_interpreter(monkeypatch):
    _parity("vision_text", "triton", monkeypatch)


@pytest.mark.parametrize(
    "extra",
    [
        dict(no_output_layer=True),
        dict(deepnorm=True),
        dict(subln=False),
        dict(layernorm_embedding=True),  # a multiway pair, split with the sequence
        dict(rel_pos_buckets=8, max_rel_pos=12),
        dict(xpos_rel_pos=True, xpos_scale_base=16),
    ],
)
def test_parity_other_configurations(extra, monkeypatch):
    _parity("vision_text", "reference", monkeypatch, **extra)


def test_state_dicts_load_both_ways(monkeypatch):
    monkeypatch.setenv(magneto_kernels.ENV_VAR, "reference")
    ts = _ts_model()
    config = config_from_torchscale(ts.args, "beit3").replace(init="paper")
    mg = magneto.BEiT3(config, img_size=IMG, patch_size=PATCH, in_chans=CHANS).eval()
    mg.load_state_dict(ts.state_dict())  # torchscale's names, q/k/v per part packed on load
    inputs = _inputs("vision_text")
    with torch.no_grad():
        _compare_outputs(mg(**inputs), ts(**inputs), {})
        fresh = TSBEiT3(_args()).eval()
        fresh.load_state_dict(to_torchscale_state_dict(mg.state_dict()))
        _compare_outputs(mg(**inputs), fresh(**inputs), {})
        back = to_torchscale(mg)
        assert isinstance(back, TSBEiT3)
        _compare_outputs(mg(**inputs), back(**inputs), {})


def _model():
    torch.manual_seed(0)
    return from_torchscale(TSBEiT3(_args())).eval()


@pytest.mark.parametrize(
    "inputs,name",
    [
        (dict(visual_tokens=torch.randn(2, CHANS, IMG + 4, IMG)), "image size"),
        (dict(visual_tokens=torch.randn(2, 1, IMG, IMG)), "channels"),
        (dict(visual_tokens=torch.randn(CHANS, IMG, IMG)), "images"),
        (dict(textual_tokens=torch.randint(0, VOCAB, (2, TEXT))), "position table"),
        (
            dict(
                textual_tokens=torch.randint(0, VOCAB, (2, 5)),
                text_padding_position=torch.zeros(2, 6, dtype=torch.bool),
            ),
            "text_padding_position",
        ),
        (
            dict(
                visual_tokens=torch.randn(2, CHANS, IMG, IMG),
                vision_masked_position=torch.zeros(2, 5, dtype=torch.bool),
            ),
            "masked_position",
        ),
        (
            dict(
                visual_tokens=torch.randn(2, CHANS, IMG, IMG),
                textual_tokens=torch.randint(0, VOCAB, (3, 5)),
            ),
            "batch size",
        ),
        (dict(), "textual_tokens or visual_tokens"),
    ],
)
def test_bad_input_names_the_problem(inputs, name):
    with pytest.raises(ValueError, match=name):
        _model()(**inputs)


def test_bad_configs_are_refused():
    config = magneto.MagnetoConfig(
        embed_dim=D, num_heads=HEADS, ffn_dim=FFN, encoder_layers=1, vocab_size=VOCAB
    )
    with pytest.raises(ValueError, match="multiway"):
        magneto.BEiT3(config)
    with pytest.raises(ValueError, match="vocab_size"):
        magneto.BEiT3(config.replace(multiway=True, vocab_size=0))
    with pytest.raises(ValueError, match="multiway"):
        config_from_torchscale(_args(multiway=False), "beit3")
    with pytest.raises(ValueError, match="padding_idx"):
        to_torchscale(
            magneto.BEiT3(
                config.replace(multiway=True, padding_idx=1), img_size=IMG, patch_size=PATCH
            )
        )


def test_drop_path_training_parity(monkeypatch):
    """In training, drop path draws one per-sample mask per block from torch's generator, for
    the two parts together, as torchscale does for the whole sequence."""
    monkeypatch.setenv(magneto_kernels.ENV_VAR, "reference")
    ts = _ts_model(drop_path_rate=0.5).train()
    mg = from_torchscale(ts)
    assert mg.training
    inputs = _inputs("vision_text", batch=8)
    outs = []
    for model in (ts, mg):
        torch.manual_seed(9)
        outs.append(model(**inputs)["encoder_out"])
    assert rel_err(outs[1], outs[0]) <= TOL


def test_same_seed_gives_torchscales_parameters():
    """With ``init="torchscale"`` (what config_from_torchscale sets) the model draws its
    parameters in torchscale's order: the same seed gives the same BEiT-3."""
    torch.manual_seed(0)
    theirs = TSBEiT3(_args()).state_dict()
    torch.manual_seed(0)
    ours = magneto.BEiT3(
        config_from_torchscale(_args(), "beit3"), img_size=IMG, patch_size=PATCH, in_chans=CHANS
    )
    ours = to_torchscale_state_dict(ours.state_dict())
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
