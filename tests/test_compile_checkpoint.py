"""torch.compile of a fused model, and activation checkpointing that replays dropout exactly."""

import models
import pytest
import torch
from harness import assert_close, require_backend

import magneto


def _encoder(backend, **overrides):
    torch.manual_seed(0)
    fixed = dict(encoder_layers=2, vocab_size=37, positions="learned")
    return magneto.Encoder(models.config(32, 2, 64, overrides, **fixed, backend=backend))


@pytest.mark.parametrize("scheme", ["subln", "deepnorm"])
def test_compile_fullgraph_matches_eager(scheme):
    require_backend("cpu")
    model = _encoder("cpu", norm_scheme=scheme).eval()
    tokens = torch.randint(2, 37, (2, 9), generator=torch.Generator().manual_seed(3))

    def loss_fn(m):
        return (m(tokens)["encoder_out"] ** 2).mean()

    eager = loss_fn(model)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(model)
    loss.backward()
    assert_close(loss, eager, 1e-5, name="compiled loss")
    for name, p in model.named_parameters():
        assert_close(p.grad, eager_grads[name], 1e-5, atol=1e-7, name=f"compiled grad of {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_checkpointing_replays_dropout_exactly(backend):
    if backend == "cpu":
        require_backend("cpu")
    drops = dict(dropout=0.2, attention_dropout=0.1, activation_dropout=0.1, drop_path=0.2)
    plain = _encoder(backend, **drops).train()
    ckpt = _encoder(backend, checkpoint_activations=True, **drops).train()
    tokens = torch.randint(2, 37, (3, 8), generator=torch.Generator().manual_seed(4))
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(11)
        out = model(tokens)["encoder_out"]
        (out.double() ** 2).sum().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.equal(p.grad, q.grad), f"grad of {name} differs under checkpointing"


def test_checkpointing_saves_less():
    from magneto.profiling import saved_tensor_bytes

    sizes = []
    for flag in (False, True):
        model = _encoder("reference", checkpoint_activations=flag, encoder_layers=3).train()
        tokens = torch.randint(2, 37, (2, 16))
        nbytes, _ = saved_tensor_bytes(lambda: model(tokens)["encoder_out"], model.parameters())
        sizes.append(nbytes)
    assert sizes[1] < sizes[0] / 3, sizes
