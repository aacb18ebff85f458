"""Parity: every public op on every backend against float64, whole models against torchscale.

An op's error is norm-wise, ``‖out − ref64‖ / ‖ref64‖`` with ``ref64`` the reference op on
float64 copies of the same inputs, for the outputs and for every input's gradient (the worst is
reported). It passes within ``max(RTOL[dtype]·‖ref64‖, 2·‖same − ref64‖) + ATOL``, ``same``
being PyTorch's own result in the op's dtype (the reference backend): the rule of
docs/design.md, Numerics and tolerances. Models compare outputs and parameter gradients with
torchscale 0.3.0's, same weights, fp32, within ``MODEL_TOL``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

import magneto_kernels as mk
from magneto.compat.torchscale import from_torchscale, to_torchscale_state_dict
from magneto.report.models import default_backend, import_torchscale
from magneto_kernels.codes import RTOL

ATOL = 1e-6
MODEL_TOL = 1e-5
DROPOUT_SEED = 1234


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _ln_linear(**options) -> Callable:
    """A case's call of ln_linear: the inputs it has (the others None), then ``options``."""

    def call(t, b):
        args = t["x"], t["ln_weight"], t.get("ln_bias"), t["weight"], t.get("bias")
        return (mk.ln_linear(*args, residual=t.get("residual"), backend=b, **options),)

    return call


def _op_cases(rows: int, cols: int, out_features: int) -> list[tuple[str, str, dict, Callable]]:
    """(op, case, float64 inputs, call(inputs, backend) -> outputs): the ops' main uses."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, mean=0.0, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean

    x = randn(rows, cols, mean=1.0, std=2.0)  # non-zero-mean rows: the hard case for a norm
    norm = dict(weight=randn(cols, mean=1.0, std=0.2), bias=randn(cols, std=0.1))
    linear = dict(
        ln_weight=norm["weight"],
        ln_bias=norm["bias"],
        weight=randn(out_features, cols, std=cols**-0.5),
        bias=randn(out_features, std=0.1),
    )
    wide = randn(rows, out_features)
    cases = [
        (
            "layer_norm",
            "LayerNorm",
            dict(x=x, **norm),
            lambda t, b: (mk.layer_norm(t["x"], t["weight"], t["bias"], backend=b),),
        ),
        (
            "layer_norm",
            "RMSNorm",
            dict(x=x, weight=norm["weight"]),
            lambda t, b: (mk.layer_norm(t["x"], t["weight"], None, norm="rms", backend=b),),
        ),
        (
            "add_layer_norm",
            "alpha 0.7",
            dict(x=x, residual=randn(rows, cols), **norm),
            lambda t, b: mk.add_layer_norm(
                t["x"], t["residual"], t["weight"], t["bias"], alpha=0.7, backend=b
            ),
        ),
        ("ln_linear", "LN, bias (q/k/v)", dict(x=x, **linear), _ln_linear()),
        ("ln_linear", "gelu (fc1)", dict(x=x, **linear), _ln_linear(activation="gelu")),
        (
            "ln_linear",
            "gelu input, residual (fc2)",
            dict(x=x, residual=wide, **linear),
            _ln_linear(input_activation="gelu", alpha=1.3),
        ),
        (
            "ln_linear",
            "RMSNorm, residual, dropout 0.1",
            dict(x=x, ln_weight=linear["ln_weight"], weight=linear["weight"], residual=wide),
            _ln_linear(norm="rms", dropout_p=0.1),
        ),
    ]
    return cases


def _run(
    call: Callable,
    inputs: dict,
    backend: str,
    dtype: torch.dtype,
    device: str,
    grads_out: list[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Outputs and input gradients of ``call`` on copies of ``inputs`` in ``dtype``; the
    dropout seed is drawn from the same generator state every time (the same mask)."""
    leaves = {k: _leaf(v.to(device=device, dtype=dtype)) for k, v in inputs.items()}
    torch.manual_seed(DROPOUT_SEED)
    outs = list(call(leaves, backend))
    torch.autograd.backward(outs, [g.to(device=device, dtype=dtype) for g in grads_out])
    return [o.detach() for o in outs], [leaves[k].grad for k in inputs]


def _error(out: Tensor, ref64: Tensor, same: Tensor, rtol: float) -> dict:
    out, ref64, same = (t.detach().double().cpu() for t in (out, ref64, same))
    ref_norm = max(ref64.norm().item(), 1e-300)
    err = (out - ref64).norm().item() if torch.isfinite(out).all() else math.inf
    bound = max(rtol * ref_norm, 2.0 * (same - ref64).norm().item()) + ATOL
    return {"rel_err": err / ref_norm, "rel_bound": bound / ref_norm, "ok": err <= bound}


def _worst(errors: list[dict]) -> dict:
    worst = max(errors, key=lambda e: e["rel_err"] / e["rel_bound"])
    return dict(worst, ok=all(e["ok"] for e in errors))


def op_parity(
    backends: list[str],
    dtypes: list[torch.dtype],
    device: str,
    rows: int,
    cols: int,
    out_features: int,
    tick: Callable[[], None] = lambda: None,
) -> list[dict]:
    """One row per (op case, dtype, backend): worst output and worst gradient error."""
    results = []
    for op, case, inputs, call in _op_cases(rows, cols, out_features):
        probe = call({k: v for k, v in inputs.items()}, "reference")
        g = torch.Generator().manual_seed(1)
        grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in probe]
        ref_out, ref_grads = _run(call, inputs, "reference", torch.float64, device, grads_out)
        for dtype in dtypes:
            same_out, same_grads = _run(call, inputs, "reference", dtype, device, grads_out)
            for backend in backends:
                outs, grads = _run(call, inputs, backend, dtype, device, grads_out)
                rtol = RTOL[dtype]
                results.append(
                    {
                        "op": op,
                        "case": case,
                        "dtype": str(dtype).replace("torch.", ""),
                        "backend": backend,
                        "shape": [rows, cols, out_features],
                        "output": _worst([_error(*t, rtol) for t in zip(outs, ref_out, same_out)]),
                        "grads": _worst(
                            [_error(*t, rtol) for t in zip(grads, ref_grads, same_grads)]
                        ),
                    }
                )
                tick()
    return results


# ------------------------------------------------------------------------------------------
# Whole models against torchscale 0.3.0

SCHEMES = {"subln": {}, "deepnorm": {"deepnorm": True}, "pre": {"subln": False}}
MODEL_SIZES = dict(embed_dim=32, attention_heads=4, ffn_embed_dim=64, layers=2)
VOCAB = 100


def _rel(ours: Tensor, theirs: Tensor) -> float:
    diff = (ours.double() - theirs.double()).norm()
    return (diff / theirs.double().norm().clamp_min(1e-30)).item()


def _torchscale_model(kind: str, scheme: str, device: str):
    config, encoder, decoder, encoder_decoder, embedding = import_torchscale()
    torch.manual_seed(0)
    enc = {f"encoder_{k}": v for k, v in MODEL_SIZES.items()}
    dec = {f"decoder_{k}": v for k, v in MODEL_SIZES.items()}
    d = MODEL_SIZES["embed_dim"]
    text = lambda: embedding.TextEmbedding(VOCAB, d, padding_idx=1)  # noqa: E731
    positions = lambda: embedding.PositionalEmbedding(66, d)  # noqa: E731
    flags = dict(SCHEMES[scheme], vocab_size=VOCAB)
    if kind == "encoder":
        model = encoder.Encoder(config.EncoderConfig(**enc, **flags), text(), positions())
    elif kind == "decoder":
        model = decoder.Decoder(config.DecoderConfig(**dec, **flags), text(), positions())
    else:
        model = encoder_decoder.EncoderDecoder(
            config.EncoderDecoderConfig(**enc, **dec, **flags),
            text(),
            positions(),
            text(),
            positions(),
        )
    with torch.no_grad():  # move LayerNorms and biases off their init values
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(device).eval()


def _model_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(2, VOCAB, (3, 12), generator=g)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, 8:] = True
    src[pad] = 1
    tgt = torch.randint(2, VOCAB, (3, 9), generator=g)
    return src.to(device), pad.to(device), tgt.to(device)


def _forward_backward(model, kind: str, inputs) -> tuple[Tensor, dict]:
    src, pad, tgt = inputs
    if kind == "encoder":
        main = model(src, encoder_padding_mask=pad)["encoder_out"]
    elif kind == "decoder":
        main = model(tgt)[0]
    else:
        main = model(src, tgt)[0]
    weights = torch.linspace(-1, 1, main.numel(), device=main.device).view_as(main)
    (main * weights).sum().backward()
    return main.detach(), {n: p.grad for n, p in model.named_parameters()}


def model_parity(
    backends: list[str],
    device: str = "cpu",
    subln_only: Iterable[str] = (),
    tick: Callable[[], None] = lambda: None,
) -> list[dict]:
    """One row per (model, scheme, backend): output and worst parameter-gradient error against
    torchscale, plus token-by-token decoding with ``incremental_state`` for the decoder.
    Backends in ``subln_only`` (the Triton interpreter: minutes for every scheme) get the
    Magneto scheme only."""
    inputs = _model_inputs(device)
    rows = []
    for kind in ("encoder", "decoder", "encoder_decoder"):
        for scheme in SCHEMES:
            theirs_model = _torchscale_model(kind, scheme, device)
            theirs, theirs_g = _forward_backward(theirs_model, kind, inputs)
            for backend in backends:
                if scheme != "subln" and backend in subln_only:
                    continue
                ours_model = from_torchscale(theirs_model)
                with default_backend(backend):
                    ours, ours_g = _forward_backward(ours_model, kind, inputs)
                ours_g = to_torchscale_state_dict(ours_g)
                # k_proj.bias has an exactly-zero gradient (softmax shift invariance): noise only.
                grad_err = max(
                    _rel(ours_g[n], g) for n, g in theirs_g.items() if not n.endswith("k_proj.bias")
                )
                out_err = _rel(ours, theirs)
                rows.append(
                    {
                        "model": kind,
                        "scheme": scheme,
                        "backend": backend,
                        "output_rel_err": out_err,
                        "grad_rel_err": grad_err,
                        "ok": max(out_err, grad_err) <= MODEL_TOL,
                    }
                )
                tick()
    theirs_model = _torchscale_model("decoder", "subln", device)
    for backend in backends:
        rows.append(dict(_decoding_parity(theirs_model, backend, device), backend=backend))
        tick()
    return rows


def _decoding_parity(theirs_model, backend: str, device: str) -> dict:
    ours_model = from_torchscale(theirs_model)
    tokens = _model_inputs(device)[2]
    states, worst = ({}, {}), 0.0
    with torch.no_grad(), default_backend(backend):
        for t in range(1, tokens.shape[1] + 1):
            theirs = theirs_model(tokens[:, :t], incremental_state=states[0])[0]
            ours = ours_model(tokens[:, :t], incremental_state=states[1])[0]
            worst = max(worst, _rel(ours, theirs))
    return {
        "model": "decoder, token by token (incremental_state)",
        "scheme": "subln",
        "output_rel_err": worst,
        "grad_rel_err": None,
        "ok": worst <= MODEL_TOL,
    }
