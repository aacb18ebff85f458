"""Every option torchscale 0.3.0's own model tests change (tests/test_encoder.py,
test_decoder.py, test_encoder_decoder.py of microsoft/torchscale: 14 + 14 + 15 cases, each a
model with one option set), plus the options its tests leave out (xPos, mixture of experts),
passed through ``from_torchscale``: a model that converts must give torchscale's outputs and
gradients (fp32, training mode, as those tests run); one that cannot is refused with a
``ValueError`` naming the option, marked ``xfail(strict=True)`` here so that wiring the option in
turns its case into a failure until the mark is removed.

The cases are written from the options alone, at small sizes (d=32, 2 layers) instead of
torchscale's defaults (d=768, 12 layers): the options, not the sizes, decide what converts.
"""

import re

import pytest
import torch
from gloo import float_histc, one_process_group
from harness import assert_close
from torchscale.architecture.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig
from torchscale.architecture.decoder import Decoder as TSDecoder
from torchscale.architecture.encoder import Encoder as TSEncoder
from torchscale.architecture.encoder_decoder import EncoderDecoder as TSEncoderDecoder
from torchscale.component.embedding import PositionalEmbedding, TextEmbedding

from magneto.compat.torchscale import from_torchscale, to_torchscale_state_dict

D, HEADS, FFN, LAYERS, VOCAB = 32, 4, 64, 2, 64
OUT_TOL, GRAD_TOL = 1e-5, 1e-5


REASONS = {  # the option a refusal names -> why it is refused today
    "layernorm_embedding": "magneto/embedding_norm.py, not wired",
    "rel_pos_buckets": "magneto/relative_position.py, not wired",
    "multiway": "multiway layers outside a BEiT3 model",
    "fsdp": "refused by the flag; magneto/compat/wrapping.py finds nothing wrapped",
    "xpos_rel_pos": "magneto/xpos.py, not wired",
    "moe_freq": "magneto/moe.py, not wired",
}

# (kind, options, the option a refusal names): torchscale's cases, in its files' order
CASES = []
for _kind, _side, _norm_before in (
    ("encoder", "encoder", {"encoder_normalize_before": False}),
    ("decoder", "decoder", {"decoder_normalize_before": False}),
    (
        "encoder_decoder",
        "decoder",
        {"encoder_normalize_before": False, "decoder_normalize_before": False},
    ),
):
    CASES += [
        (_kind, {}, None),
        (_kind, {"vocab_size": 64000}, None),
        (_kind, {"activation_fn": "relu"}, None),
        (_kind, {"drop_path_rate": 0.1}, None),
        (_kind, dict(_norm_before), None),
        (_kind, {"no_scale_embedding": False}, None),
        (_kind, {"layernorm_embedding": True}, "layernorm_embedding"),
        (_kind, {"rel_pos_buckets": 32, "max_rel_pos": 256}, "rel_pos_buckets"),
        (_kind, {"deepnorm": True, "subln": False, **_norm_before}, None),
        (_kind, {"bert_init": True}, None),
        (_kind, {"multiway": True}, "multiway"),
        (_kind, {f"share_{_side}_input_output_embed": True}, None),
    ]
    if _kind == "encoder_decoder":
        CASES.append((_kind, {"share_all_embeddings": True}, None))
    CASES += [
        (_kind, {"checkpoint_activations": True}, None),
        (_kind, {"fsdp": True}, "fsdp"),
    ]
assert len(CASES) == 43

# beyond torchscale's tests: options of its configs those tests never set
MOE_OPTIONS = {"moe_freq": 2, "moe_expert_count": 2}
EXTRA_CASES = [
    (kind, options, refused)
    for kind in ("encoder", "decoder", "encoder_decoder")
    for options, refused in (
        ({"xpos_rel_pos": True}, "xpos_rel_pos"),
        ({**MOE_OPTIONS, "moe_top1_expert": True}, "moe_freq"),
        ({**MOE_OPTIONS, "moe_second_expert_policy": "sampling"}, "moe_freq"),
        ({**MOE_OPTIONS, "use_xmoe": True}, "moe_freq"),
    )
]


def _id(case):
    kind, options, _ = case
    return kind + ":" + (",".join(f"{k}={v}" for k, v in options.items()) or "default")


def _params(cases):
    def marks(refused):
        reason = f"{refused}: {REASONS[refused]}"
        return [pytest.mark.xfail(strict=True, raises=ValueError, reason=reason)]

    return [pytest.param(c, id=_id(c)) for c in cases]


@pytest.fixture
def moe_process_group(monkeypatch):
    """torchscale's MoE layers need torch.distributed, and on CPU a float histogram."""
    float_histc(monkeypatch)
    with one_process_group():
        yield


def _sizes(kind):
    sides = {"encoder": ["encoder"], "decoder": ["decoder"]}.get(kind, ["encoder", "decoder"])
    dims = dict(embed_dim=D, attention_heads=HEADS, ffn_embed_dim=FFN, layers=LAYERS)
    return {f"{side}_{k}": v for side in sides for k, v in dims.items()}


def _build(kind, options):
    """torchscale's model as its test builds it (sizes aside), and that test's inputs."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "encoder":
        model = TSEncoder(EncoderConfig(**_sizes(kind), **options))
        return model, dict(src_tokens=None, token_embeddings=torch.rand(2, 10, D, generator=g))
    if kind == "decoder":
        model = TSDecoder(DecoderConfig(**_sizes(kind), **options))
        inputs = dict(
            prev_output_tokens=torch.randint(2, VOCAB, (2, 10), generator=g),
            token_embeddings=torch.rand(2, 10, D, generator=g),
            features_only=True,
        )
        return model, inputs
    args = EncoderDecoderConfig(**_sizes(kind), **options)
    model = TSEncoderDecoder(
        args,
        encoder_embed_tokens=TextEmbedding(VOCAB, D),
        decoder_embed_tokens=TextEmbedding(VOCAB, D),
        encoder_embed_positions=PositionalEmbedding(args.max_source_positions, D),
        decoder_embed_positions=PositionalEmbedding(args.max_target_positions, D),
    )
    inputs = dict(
        src_tokens=torch.randint(2, VOCAB, (2, 20), generator=g),
        prev_output_tokens=torch.randint(2, VOCAB, (2, 10), generator=g),
        features_only=True,
    )
    return model, inputs


def _outputs(result):
    """(features, [l_aux of the MoE layers])."""
    if isinstance(result, dict):  # an encoder's
        return result["encoder_out"], [t for t in result["l_aux"] if t is not None]
    return result[0], [t for t in result[1]["l_aux"] if t is not None]


def _run(model, inputs):
    torch.manual_seed(2)  # drop path draws from torch's generator on both sides
    out, l_aux = _outputs(model(**inputs))
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out * dy).sum() + sum(l_aux)).backward()
    return out, l_aux


def _check(case):
    kind, options, refused = case
    model, inputs = _build(kind, options)
    model.train()
    try:
        converted = from_torchscale(model)
    except ValueError as err:
        assert refused and refused in str(err), f"refused for another reason: {err}"
        raise
    assert converted.training
    out_ts, l_aux_ts = _run(model, inputs)
    out, l_aux = _run(converted, inputs)
    assert_close(out, out_ts, OUT_TOL)
    assert len(l_aux) == len(l_aux_ts)
    for i, (ours, theirs) in enumerate(zip(l_aux, l_aux_ts)):
        assert_close(ours, theirs, OUT_TOL, name=f"l_aux[{i}]")
    grads_ts = {n: p.grad for n, p in model.named_parameters()}
    grads = to_torchscale_state_dict({n: p.grad for n, p in converted.named_parameters()})
    assert grads.keys() == grads_ts.keys()
    for name, grad in grads_ts.items():
        if grad is None:  # a parameter the call does not use (features_only: the projection)
            assert grads[name] is None, name
            continue
        if re.search(r"k_proj(\.[AB])?\.bias$", name) and not options.get("xpos_rel_pos"):
            # zero in exact arithmetic (a key bias shifts all of a query's scores alike; not
            # once xPos rotates it per position): both sides hold rounding noise, judged
            # against the key weight's gradient
            atol = GRAD_TOL * grads_ts[name[:-4] + "weight"].norm().item()
            assert_close(grads[name], grad, 0.0, atol=atol, name=name)
            assert_close(grad, torch.zeros_like(grad), 0.0, atol=atol, name=name)
            continue
        assert_close(grads[name], grad, GRAD_TOL, name="grad " + name)


@pytest.mark.parametrize("case", _params(CASES))
def test_torchscale_test_case_converts_or_is_refused(case):
    _check(case)


@pytest.mark.parametrize("case", _params(EXTRA_CASES))
def test_option_beyond_torchscale_tests(case, request):
    if "moe_freq" in case[1]:
        request.getfixturevalue("moe_process_group")
    _check(case)
