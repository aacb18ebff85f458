"""Multiway encoder layers (``MagnetoConfig.multiway``): memory, exactness of the single-part
paths, the split on every norm scheme and backend, torch.compile, and the errors."""

import models
import pytest
import torch
from harness import assert_close, require_backend
from models import perturb

import magneto
import magneto_kernels
from magneto.multiway import Multiway
from magneto.profiling import saved_tensor_bytes

D, HEADS, FFN = 32, 4, 48
SCHEMES = ["subln", "pre", "post", "deepnorm"]


def _config(**overrides):
    fixed = dict(encoder_layers=2, positions="none", multiway=True)
    return models.config(D, HEADS, FFN, overrides, **fixed, backend="reference")


def _encoder(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(magneto.Encoder(_config(**overrides)), seed).eval()


def _input(batch=3, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, D, generator=g)


def _copy_part_into(plain, multiway, part):
    """Load copy ``part`` of ``multiway``'s parameters into the non-multiway ``plain``."""
    from magneto.compat.torchscale import to_torchscale_state_dict

    name = "AB"[part]
    state = {}
    for key, value in to_torchscale_state_dict(multiway.state_dict()).items():
        if f".{name}." in key or key.endswith(f".{name}"):
            state[key.replace(f".{name}.", ".").replace(f".{name}", "")] = value
        elif ".A." not in key and ".B." not in key:
            state[key] = value
    plain.load_state_dict(state)


# ------------------------------------------------------------------------------------------
# memory

MEM_D, MEM_HEADS, MEM_FFN, MEM_T, MEM_BATCH = 256, 4, 1024, 128, 2
# 10 d-vectors per token, fp32 (mean, rstd) of five norms, SDPA's per-head logsumexp
# (docs/design.md, Memory accounting).
PLAIN_PER_TOKEN = 10 * MEM_D * 4 + 5 * 2 * 4 + MEM_HEADS * 4


def _saved_per_token(encoder, split, positions=None):
    encoder.train()
    x = torch.randn(MEM_BATCH, MEM_T, MEM_D, requires_grad=True)

    def forward():
        return encoder(
            None, token_embeddings=x, multiway_split_position=split, positions=positions
        )["encoder_out"]

    nbytes, _ = saved_tensor_bytes(forward, exclude=[*encoder.parameters(), x])
    return nbytes / (MEM_BATCH * MEM_T)


def _mem_encoder(layers, **overrides):
    assert magneto_kernels.resolve_backend(None, torch.empty(1)) == "cpu", (
        "the default CPU backend should be the fused C++ one"
    )
    torch.manual_seed(0)
    fixed = dict(encoder_layers=layers, positions="none", multiway=True)
    return magneto.Encoder(models.config(MEM_D, MEM_HEADS, MEM_FFN, overrides, **fixed))


@pytest.mark.parametrize("split", [-1, 0, None])
def test_single_part_multiway_layer_saves_what_the_plain_layer_saves(split):
    assert _saved_per_token(_mem_encoder(1), split) == PLAIN_PER_TOKEN


def test_split_multiway_layer_saves_the_plain_count_per_layer():
    """A split inside the sequence: each layer saves exactly what a plain layer saves. The
    only extra is the input cut into its two parts, once per forward (one d-vector per token);
    with position embeddings (BEiT-3) the parts are the sums with the positions, which a plain
    encoder saves too, so not even that."""
    split = 50
    one = _saved_per_token(_mem_encoder(1), split)
    two = _saved_per_token(_mem_encoder(2), split)
    assert one == PLAIN_PER_TOKEN + MEM_D * 4
    plain_one = _saved_per_token(_mem_encoder(1, multiway=False), None)
    plain_two = _saved_per_token(_mem_encoder(2, multiway=False), None)
    assert two - one == plain_two - plain_one
    learned = _saved_per_token(_mem_encoder(1, positions="learned"), split)
    plain_learned = _saved_per_token(_mem_encoder(1, positions="learned", multiway=False), None)
    assert learned == plain_learned


# ------------------------------------------------------------------------------------------
# exactness and the split itself


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("split,part", [(-1, 0), (None, 0), (9, 0), (0, 1)])
def test_single_part_is_the_plain_path_bit_for_bit(scheme, split, part):
    multiway = _encoder(norm_scheme=scheme)
    torch.manual_seed(0)
    plain = magneto.Encoder(_config(norm_scheme=scheme, multiway=False)).eval()
    _copy_part_into(plain, multiway, part)
    x = _input()
    ours = multiway(None, token_embeddings=x, multiway_split_position=split)["encoder_out"]
    theirs = plain(None, token_embeddings=x)["encoder_out"]
    assert torch.equal(ours, theirs)


def _twin_parts(encoder):
    """Make every B copy equal to its A copy: then any split computes the all-A result."""
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, Multiway):
                module.B.load_state_dict(module.A.state_dict())
    return encoder


@pytest.mark.parametrize("scheme", SCHEMES)
def test_split_with_equal_copies_is_the_single_part_result(scheme):
    encoder = _twin_parts(_encoder(norm_scheme=scheme, dropout=0.0))
    x, pad = _input(), torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    whole = encoder(
        None,
        token_embeddings=x,
        encoder_padding_mask=pad,
        multiway_split_position=-1,
        return_all_hiddens=True,
    )
    for split in (1, 4, 8):
        out = encoder(
            None,
            token_embeddings=x,
            encoder_padding_mask=pad,
            multiway_split_position=split,
            return_all_hiddens=True,
        )
        assert_close(out["encoder_out"], whole["encoder_out"], 1e-6, name=f"split {split}")
        for i, (a, b) in enumerate(zip(out["encoder_states"], whole["encoder_states"])):
            assert_close(a, b, 1e-6, name=f"state {i}, split {split}")


def test_split_uses_each_part_for_its_own_tokens():
    """The per-token sublayers keep the parts apart (attention alone mixes them): changing
    copy A of the FFN changes the A part's FFN output and leaves the B part's as it was."""
    encoder = _encoder(encoder_layers=1, normalize_output=False)
    layer = encoder.layers[0]
    parts = [_input(length=4, seed=2), _input(length=5, seed=3)]
    ffn_out = layer.ffn(parts)
    with torch.no_grad():
        layer.ffn.A.fc2.bias.add_(1.0)
    changed = layer.ffn(parts)
    assert not torch.equal(changed[0], ffn_out[0])
    assert torch.equal(changed[1], ffn_out[1])


def _loss_and_grads(encoder, x, split):
    x = x.clone().requires_grad_()
    out = encoder(None, token_embeddings=x, multiway_split_position=split)["encoder_out"]
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    grads = torch.autograd.grad(loss, [x, *encoder.parameters()])
    return out, grads


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("scheme", ["subln", "deepnorm"])
def test_split_on_fused_backends_matches_reference(backend, scheme):
    require_backend(backend)
    reference = _encoder(norm_scheme=scheme, encoder_layers=1)
    fused = _encoder(norm_scheme=scheme, encoder_layers=1, backend=backend)
    x = _input(batch=2, length=7)
    ref_out, ref_grads = _loss_and_grads(reference, x, 3)
    out, grads = _loss_and_grads(fused, x, 3)
    assert_close(out, ref_out, 1e-5, name="output")
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for name, g, ref in zip(names, grads, ref_grads):
        assert_close(g, ref, 1e-5, atol=1e-6, name=f"grad {name}")


def test_training_with_drop_path_and_checkpointing_replays_the_split():
    encoder = _encoder(drop_path=0.5, dropout=0.1, checkpoint_activations=True).train()
    x = _input(batch=4).requires_grad_()
    torch.manual_seed(3)
    out = encoder(None, token_embeddings=x, multiway_split_position=5)["encoder_out"]
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in encoder.named_parameters():
        assert p.grad is not None, name


def test_compile_one_multiway_layer():
    require_backend("cpu")
    torch.manual_seed(0)
    layer = perturb(magneto.EncoderLayer(_config(backend="cpu"))).eval()
    x = _input(batch=2, length=7).requires_grad_()

    def run(x):
        return layer(x, multiway_split_position=3)[0].square().sum()

    eager = run(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    loss = compiled(x)
    (grad,) = torch.autograd.grad(loss, x)
    assert_close(loss, eager, 1e-5, name="compiled loss")
    assert_close(grad, eager_grad, 1e-5, name="compiled grad")


# ------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("split", [-2, 10, 2.5, True])
def test_split_outside_the_sequence_is_refused(split):
    encoder = _encoder()
    with pytest.raises(ValueError, match="multiway_split_position"):
        encoder(None, token_embeddings=_input(), multiway_split_position=split)
    with pytest.raises(ValueError, match="multiway_split_position"):
        encoder.layers[0](_input(), multiway_split_position=split)


def test_split_on_a_plain_model_and_multiway_moe_layers_are_refused():
    plain = magneto.Encoder(_config(multiway=False))
    with pytest.raises(ValueError, match="multiway_split_position"):
        plain(None, token_embeddings=_input(), multiway_split_position=3)
    with pytest.raises(ValueError, match="moe_freq: multiway encoder layers cannot be MoE"):
        magneto.Encoder(_config(moe_freq=1, moe_expert_count=2))
    with pytest.raises(ValueError, match="part"):
        _encoder().layers[0].forward_parts([_input(length=3)])
