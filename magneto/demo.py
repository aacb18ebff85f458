"""``python -m magneto.demo``: build a Magneto encoder and decoder, run forward and backward, and
print their parity against torchscale 0.3.0 (relative errors of outputs and gradients).

Runs on CPU in a few seconds. The parity part needs torchscale (``pip install fairscale==0.4.0
&& pip install --no-deps torchscale==0.3.0``); torchscale imports one function from timm, and
where timm is not installed the labelled stand-in ``magneto.compat.timm_standin`` is used.
"""
from __future__ import annotations

import time

import torch

import magneto
import magneto_kernels
from magneto.compat import timm_standin
from magneto.compat.torchscale import from_torchscale, to_torchscale_state_dict


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours.double() - theirs.double()).norm()
    return (diff / theirs.double().norm().clamp_min(1e-30)).item()


def run_backbone() -> None:
    """A 6+6-layer Sub-LN encoder and decoder (d=256) on random tokens, forward and backward."""
    torch.manual_seed(0)
    config = magneto.MagnetoConfig(embed_dim=256, num_heads=8, ffn_dim=1024, encoder_layers=6,
                                   decoder_layers=6, vocab_size=1000, padding_idx=1)
    encoder, decoder = magneto.Encoder(config), magneto.Decoder(config)
    tokens = torch.randint(2, 1000, (4, 64))
    backend = magneto_kernels.resolve_backend(config.backend, torch.empty(0))
    gamma = magneto.layer_scales(config, "encoder").ffn
    print(f"Magneto (Sub-LN) encoder + decoder: d={config.embed_dim}, heads={config.num_heads}, "
          f"ffn={config.ffn_dim}, N=M={config.encoder_layers}, init gamma={gamma:.4f}, "
          f"backend={backend!r}")
    for name, model in (("encoder", encoder), ("decoder", decoder)):
        start = time.perf_counter()
        out = model(tokens)
        logits = out["encoder_out"] if isinstance(out, dict) else out[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
        grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        print(f"  {name}: logits {tuple(logits.shape)}, loss {loss.item():.4f}, "
              f"grad norm {grad_norm.item():.4f}, forward+backward "
              f"{time.perf_counter() - start:.2f} s")


def _import_torchscale():
    timm_standin.use_if_missing()  # torchscale imports timm.models.layers.drop_path
    from torchscale.architecture import config, decoder, encoder, encoder_decoder
    from torchscale.component.embedding import PositionalEmbedding, TextEmbedding
    return config, encoder, decoder, encoder_decoder, TextEmbedding, PositionalEmbedding


def _torchscale_model(ts, kind: str, scheme: str):
    config, encoder, decoder, encoder_decoder, text, positions = ts
    flags = {"subln": {}, "deepnorm": {"deepnorm": True}, "pre": {"subln": False}}[scheme]
    sizes = dict(embed_dim=64, attention_heads=4, ffn_embed_dim=128, layers=3)
    enc = {f"encoder_{k}": v for k, v in sizes.items()}
    dec = {f"decoder_{k}": v for k, v in sizes.items()}
    if kind == "encoder":
        model = encoder.Encoder(config.EncoderConfig(**enc, vocab_size=100, **flags),
                                text(100, 64, padding_idx=1), positions(66, 64))
    elif kind == "decoder":
        model = decoder.Decoder(config.DecoderConfig(**dec, vocab_size=100, **flags),
                                text(100, 64, padding_idx=1), positions(66, 64))
    else:
        model = encoder_decoder.EncoderDecoder(
            config.EncoderDecoderConfig(**enc, **dec, vocab_size=100, **flags),
            text(100, 64, padding_idx=1), positions(66, 64), text(100, 64, padding_idx=1),
            positions(66, 64))
    with torch.no_grad():  # move LayerNorms and biases off their init values
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _forward_backward(model, kind: str, src, pad, tgt):
    if kind == "encoder":
        out = model(src, encoder_padding_mask=pad)
        main = out["encoder_out"]
    elif kind == "decoder":
        out = model(tgt)
        main = out[0]
    else:
        out = model(src, tgt)
        main = out[0]
    (main * torch.linspace(-1, 1, main.numel()).view_as(main)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return main.detach(), grads


def parity_table() -> list[tuple[str, str, float, float]]:
    """(model, scheme, output rel. error, worst parameter-gradient rel. error) vs torchscale."""
    ts = _import_torchscale()
    torch.manual_seed(0)
    src = torch.randint(2, 100, (3, 12))
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, 8:] = True
    src[pad] = 1
    tgt = torch.randint(2, 100, (3, 9))
    rows = []
    for kind in ("encoder", "decoder", "encoder_decoder"):
        for scheme in ("subln", "deepnorm", "pre"):
            theirs_model = _torchscale_model(ts, kind, scheme)
            ours_model = from_torchscale(theirs_model)
            theirs, theirs_g = _forward_backward(theirs_model, kind, src, pad, tgt)
            ours, ours_g = _forward_backward(ours_model, kind, src, pad, tgt)
            ours_g = to_torchscale_state_dict(ours_g)
            # k_proj.bias has an exactly-zero gradient (softmax shift invariance): noise only.
            grad_err = max(_rel(ours_g[n], g) for n, g in theirs_g.items()
                           if not n.endswith("k_proj.bias"))
            rows.append((kind, scheme, _rel(ours, theirs), grad_err))
    return rows


def incremental_parity() -> float:
    """Worst relative error of token-by-token decoding (incremental_state) vs torchscale's."""
    ts = _import_torchscale()
    theirs_model = _torchscale_model(ts, "decoder", "subln")
    ours_model = from_torchscale(theirs_model)
    tokens = torch.randint(2, 100, (2, 8))
    states, worst = ({}, {}), 0.0
    with torch.no_grad():
        for t in range(1, 9):
            theirs = theirs_model(tokens[:, :t], incremental_state=states[0])[0]
            ours = ours_model(tokens[:, :t], incremental_state=states[1])[0]
            worst = max(worst, _rel(ours, theirs))
    return worst


def main() -> None:
    run_backbone()
    try:
        rows = parity_table()
    except ImportError as err:
        print(f"\nParity against torchscale skipped: {err}")
        return
    backend = magneto_kernels.resolve_backend(None, torch.empty(0))
    print(f"\nParity against torchscale 0.3.0 (fp32, eval, same weights, backend {backend!r}; "
          "relative errors ||ours - torchscale|| / ||torchscale||):")
    print(f"  {'model':<16}{'scheme':<10}{'output':>12}{'worst grad':>12}")
    for kind, scheme, out_err, grad_err in rows:
        print(f"  {kind:<16}{scheme:<10}{out_err:>12.2e}{grad_err:>12.2e}")
    print(f"  token-by-token decoding with incremental_state: {incremental_parity():.2e}")
    worst = max(max(r[2], r[3]) for r in rows)
    print(f"\nworst relative error {worst:.2e} ({'within' if worst <= 1e-5 else 'ABOVE'} 1e-5)")


if __name__ == "__main__":
    main()
