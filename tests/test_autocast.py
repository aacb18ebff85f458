"""The ops and the modules under ``torch.autocast`` (magneto_kernels/autocast.py has the rule).

The ops: on every backend, a call under autocast equals the call on the inputs cast by the rule
(ln_linear's linear operands to the autocast dtype, the norm parameters to float32,
add_layer_norm's x and residual to the wider dtype), gradients included, in each tensor's dtype.
The modules: every ``magneto.nn`` layer and every model run under CPU autocast (bf16, fp16)
close to their float32 result: within 2× the error the reference backend (plain PyTorch ops under
the same autocast) makes, plus a floor of ``RTOL[dtype]``.
"""

import pytest
import torch
from harness import BY_NAME, assert_close, backend_params, randn, require_backend
from torchscale.architecture.config import EncoderConfig
from torchscale.architecture.encoder import Encoder as TSEncoder

import magneto
import magneto_kernels as mk
from magneto.compat.torchscale import from_torchscale
from magneto.nn import TransformerDecoderLayer, TransformerEncoderLayer
from magneto_kernels.codes import RTOL

LOW = [torch.bfloat16, torch.float16]
D, HEADS, FFN = 32, 4, 48


@pytest.fixture(params=backend_params(kernels_only=False))
def backend(request):
    with request.param.running() as b:
        yield b


def _leaves(tensors):
    return {
        k: None if t is None else t.detach().clone().requires_grad_() for k, t in tensors.items()
    }


def _grads(out, leaves, seed=7):
    dy = randn(*out.shape, dtype=out.dtype, mean=0.3, generator=torch.Generator().manual_seed(seed))
    present = [k for k, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in present], dy)
    return dict(zip(present, grads))


def _same_call(backend, fn, inputs, cast):
    """``fn`` under autocast on the float32 ``inputs``, and on ``cast(inputs)`` without it: equal
    bit for bit, outputs and gradients, each gradient in its input's dtype."""
    under = _leaves(inputs)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=cast.low):
        out = fn(**under, backend=backend.name)
    plain = _leaves(inputs)
    torch.manual_seed(0)
    want = fn(**cast(plain), backend=backend.name)
    assert out.dtype == want.dtype and torch.equal(out, want)
    got, expected = _grads(out, under), _grads(want, plain)
    for k, g in got.items():
        assert g.dtype == inputs[k].dtype, k
        assert torch.equal(g, expected[k]), k


class _Rule:
    """The autocast rule written out: ``low_names`` to the autocast dtype ``low``,
    ``fp32_names`` to float32."""

    def __init__(self, low, low_names=(), fp32_names=()):
        self.low, self.low_names, self.fp32_names = low, low_names, fp32_names

    def __call__(self, t):
        t = dict(t)
        for k in self.low_names:
            t[k] = None if t[k] is None else t[k].to(self.low)
        for k in self.fp32_names:
            t[k] = None if t[k] is None else t[k].float()
        return t


@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_ln_linear_under_autocast_is_the_cast_call(backend, low, norm):
    inputs = {
        "x": randn(9, 24, mean=1.5),
        "ln_weight": randn(24, mean=1.0, std=0.3),
        "ln_bias": randn(24, mean=0.1, std=0.3) if norm == "layer" else None,
        "weight": randn(16, 24, std=0.2),
        "bias": randn(16, mean=0.1, std=0.2),
        "residual": randn(9, 16, mean=-0.5),
    }

    def fn(x, ln_weight, ln_bias, weight, bias, residual, backend):
        return mk.ln_linear(
            x, ln_weight, ln_bias, weight, bias, residual=residual, norm=norm,
            activation="gelu", alpha=0.7, dropout_p=0.2, backend=backend,
        )  # fmt: skip

    rule = _Rule(low, low_names=("x", "weight", "bias", "residual"))
    _same_call(backend, fn, inputs, rule)


@pytest.mark.parametrize("low", LOW, ids=str)
def test_norm_ops_under_autocast(backend, low):
    """layer_norm keeps x's dtype (bf16 x with bf16 parameters: the parameters go to float32);
    add_layer_norm of a low-precision x and a float32 residual runs in float32."""
    params = {"weight": randn(40, dtype=low, mean=1.0, std=0.3), "bias": randn(40, dtype=low)}
    inputs = {"x": randn(5, 40, dtype=low, mean=2.0), **params}

    def ln(x, weight, bias, backend):
        return mk.layer_norm(x, weight, bias, backend=backend)

    _same_call(backend, ln, inputs, _Rule(low, fp32_names=("weight", "bias")))

    inputs = {"x": randn(5, 40, dtype=low, mean=2.0), "residual": randn(5, 40, mean=-1), **params}

    def add_ln(x, residual, weight, bias, backend):
        return torch.cat(mk.add_layer_norm(x, residual, weight, bias, alpha=1.3, backend=backend))

    rule = _Rule(low, fp32_names=("x", "weight", "bias"))
    _same_call(backend, add_ln, inputs, rule)


# ------------------------------------------------------------------------------------ modules


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _autocast_errors(model, run, low, backend, monkeypatch):
    """Relative error of the output and of the parameters' gradients under autocast against
    float32, on ``backend``."""
    monkeypatch.setenv(mk.ENV_VAR, backend)

    def once(autocast):
        model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=low, enabled=autocast):
            out = run(model)
        dy = randn(*out.shape, mean=0.2, generator=torch.Generator().manual_seed(3))
        (out.float() * dy).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.float().detach(), grads.clone()

    out32, grad32 = once(False)
    out, grad = once(True)
    assert out.isfinite().all() and grad.isfinite().all()
    return _rel(out, out32), _rel(grad, grad32)


def _layer(cls):
    torch.manual_seed(0)
    return cls(d_model=D, nhead=HEADS, dim_feedforward=FFN, batch_first=True, dropout=0.0)


def _config(**extra):
    fields = dict(embed_dim=D, num_heads=HEADS, ffn_dim=FFN, encoder_layers=2, decoder_layers=2)
    return magneto.MagnetoConfig(**{**fields, "positions": "none", "vocab_size": 30, **extra})


def _ts_encoder():
    torch.manual_seed(0)
    args = EncoderConfig(
        encoder_embed_dim=D, encoder_attention_heads=HEADS, encoder_ffn_embed_dim=FFN,
        encoder_layers=2, vocab_size=30, subln=True,
    )  # fmt: skip
    return from_torchscale(TSEncoder(args))


X = randn(2, 6, D, mean=0.3, device="cpu", generator=torch.Generator().manual_seed(1))
MEMORY = randn(2, 5, D, device="cpu", generator=torch.Generator().manual_seed(2))
IMAGES = randn(2, 3, 8, 8, device="cpu", generator=torch.Generator().manual_seed(4))
TOKENS = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(3))

MODELS = {
    "nn.TransformerEncoderLayer": (lambda: _layer(TransformerEncoderLayer), lambda m: m(X)),
    "nn.TransformerDecoderLayer": (lambda: _layer(TransformerDecoderLayer), lambda m: m(X, MEMORY)),
    "Encoder": (
        lambda: magneto.Encoder(_config()),
        lambda m: m(None, token_embeddings=X)["encoder_out"],
    ),
    "Encoder-deepnorm": (
        lambda: magneto.Encoder(_config(norm_scheme="deepnorm")),
        lambda m: m(None, token_embeddings=X)["encoder_out"],
    ),
    "Decoder": (lambda: magneto.Decoder(_config()), lambda m: m(TOKENS)[0]),
    "EncoderDecoder": (lambda: magneto.EncoderDecoder(_config()), lambda m: m(TOKENS, TOKENS)[0]),
    "BEiT3": (
        lambda: magneto.BEiT3(_config(multiway=True), img_size=8, patch_size=4, in_chans=3),
        lambda m: m(textual_tokens=TOKENS, visual_tokens=IMAGES)["encoder_out"],
    ),
    "from_torchscale": (_ts_encoder, lambda m: m(None, token_embeddings=X)["encoder_out"]),
}


@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend_name", ["cpu", "cuda"])
def test_modules_under_cpu_autocast(name, low, backend_name, monkeypatch):
    """Each model under autocast, on a kernel backend, errs against its float32 result no more
    than twice what the same model errs on the reference backend (plain PyTorch ops, the
    same autocast), or ``RTOL[low]``."""
    backend = BY_NAME[backend_name]
    if backend.gpu:
        pytest.skip("the CUDA backend runs on CPU tensors only when emulated")
    require_backend(backend_name, "cpu")
    build, run = MODELS[name]
    model = build().train()
    errors = _autocast_errors(model, run, low, backend_name, monkeypatch)
    torch_errors = _autocast_errors(model, run, low, "reference", monkeypatch)
    for what, err, torch_err in zip(("output", "gradients"), errors, torch_errors):
        bound = max(2.0 * torch_err, RTOL[low])
        assert err <= bound, f"{what}: {err:.3e} > {bound:.3e} (reference {torch_err:.3e})"


def test_triton_layer_under_cpu_autocast(monkeypatch):
    """The Triton backend (interpreted: one layer) under autocast, as the others."""
    require_backend("triton", "cpu")
    build, run = MODELS["nn.TransformerEncoderLayer"]
    model = build()
    errors = _autocast_errors(model, run, torch.bfloat16, "triton", monkeypatch)
    torch_errors = _autocast_errors(model, run, torch.bfloat16, "reference", monkeypatch)
    for err, torch_err in zip(errors, torch_errors):
        assert err <= max(2.0 * torch_err, RTOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_layer_under_cuda_autocast(backend_name, monkeypatch):
    """AutocastCUDA: the same rule on a GPU (fp16 and bf16)."""
    require_backend(backend_name, "cuda")
    monkeypatch.setenv(mk.ENV_VAR, backend_name)
    layer = _layer(TransformerEncoderLayer).cuda()
    x = X.cuda()
    want = layer(x)
    for low in LOW:
        with torch.autocast("cuda", dtype=low):
            out = layer(x)
        assert out.dtype == low
        assert_close(out.float(), want, rtol=4 * RTOL[low], atol=1e-3)
