"""``ln_linear_group``: several projections of one normalised input (q/k/v, gate/up) as one op.

The projections of a group share x and its norm. The op returns one output per weight, and its
backward is one for the group: the projections' input gradients are summed (``dh = sum_i
dy_i @ W_i``) before one norm backward of the family (``layer_norm_backward``), instead of one
norm backward per projection and autograd's accumulation of their input gradients. Backward
keeps only x and one set of row statistics, and recomputes the normalised row (one
``layer_norm`` of the family) for the weight gradients.

The forward, by size, without copying a weight where it matters:
- a gradient recorded: one fused ``ln_linear`` per weight (the norm in each GEMM's prologue,
  O(in_features) a row, beside the GEMM's O(in_features x out_features));
- no gradient, rows >= in_features: one ``ln_linear`` on the weights concatenated (x read and
  normalised once; the weight copy is O(1/rows) of the GEMM);
- no gradient, fewer rows (decode): one ``ln_linear`` per weight, since the GEMMs only stream
  the weights there and a copy would double that traffic.
Reading the weight list in the kernels themselves (one prologue for every weight) is the next
step; docs/design.md, Decisions: grouped projections, has the measurements.

Why a list of weights and a tuple of outputs rather than one packed weight: the callers (the
Hugging Face integration, user code) own one ``nn.Linear`` per projection, and a list keeps each
its own parameter and gradient; magneto's own models keep one packed ``in_proj`` parameter.
The reference family runs the concatenation through PyTorch's autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from magneto_kernels import ops
from magneto_kernels.backends import FAMILY, cached_backend, resolve_backend
from magneto_kernels.library import get_op


def _check(x: Tensor, weights: Sequence[Tensor], biases) -> None:
    if len(weights) == 0:
        raise ValueError("ln_linear_group: weights is empty")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(
            f"ln_linear_group: {len(biases)} biases for {len(weights)} weights "
            "(give None for a projection without one)"
        )
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != weights[0].shape[1]:
            raise ValueError(
                f"ln_linear_group: weights[{i}] has shape {tuple(w.shape)}; every weight must be "
                f"(out_features, {weights[0].shape[1]})"
            )
        if w.dtype != weights[0].dtype or w.device != weights[0].device:
            raise ValueError(
                f"ln_linear_group: weights[{i}] is {w.dtype} on {w.device}, weights[0] is "
                f"{weights[0].dtype} on {weights[0].device}"
            )


def _cat_bias(weights: Sequence[Tensor], biases) -> Optional[Tensor]:
    if biases is None or all(b is None for b in biases):
        return None
    return torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])


class _Group(torch.autograd.Function):
    """The kernel families' group: one fused ``ln_linear`` per weight forward (the norm in each
    GEMM's prologue), one backward for the group (see the top of the file)."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, norm, family, call, has_bias, *params):
        n = len(has_bias)
        weights, present = params[:n], iter(params[n:])
        outs = []
        for w, b in zip(weights, has_bias):
            y, mean, rstd, _ = call(
                x, ln_weight, ln_bias, w, next(present) if b else None,
                None, None, eps, norm, "none", "none", 1.0, 0.0, "none", None,
            )  # fmt: skip
            outs.append(y)
        ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, *weights)
        ctx.config = (eps, norm, family, has_bias)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        eps, norm, family, has_bias = ctx.config
        x, ln_weight, ln_bias, mean, rstd, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        # h = N(x) for the weight gradients: recomputed (O(in_features) a row), never kept
        h = (
            x2
            if norm == "none"
            else get_op("layer_norm", family)(x2, ln_weight, ln_bias, eps, norm)[0]
        )
        dh, dweights, dbiases = None, [], []
        for i, (g, w) in enumerate(zip(grads, weights)):
            if g is None:
                dweights.append(None)
                dbiases.append(None)
                continue
            g2 = g.reshape(-1, g.shape[-1])
            if need[0] or need[1] or need[2]:  # the group's input gradient, summed here
                dh = g2 @ w if dh is None else dh.addmm_(g2, w)
            dweights.append(g2.t() @ h if need[8 + i] else None)
            dbiases.append(g2.sum(0) if has_bias[i] else None)
        dx = dln_weight = dln_bias = None
        if dh is not None:
            if norm == "none":
                dx = dh
            else:
                mask = [need[0], need[1], ln_bias is not None and need[2]]
                dx, dln_weight, dln_bias = get_op("layer_norm_backward", family)(
                    dh, x2, ln_weight, ln_bias, mean, rstd, None, norm, mask
                )
                dx, dln_weight = (dx if mask[0] else None), (dln_weight if mask[1] else None)
                dln_bias = dln_bias if mask[2] else None
            if dx is not None:
                dx = dx.view(x.shape)
        return (
            dx, dln_weight, dln_bias, None, None, None, None, None,
            *dweights, *[d for d, present in zip(dbiases, has_bias) if present],
        )  # fmt: skip


def ln_linear_group(
    x: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    weights: Sequence[Tensor],
    biases: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    eps: float = 1e-5,
    norm: str = "layer",
    backend: Optional[str] = None,
) -> tuple[Tensor, ...]:
    """``tuple(N(x) @ w.T + b for w, b in zip(weights, biases))`` as one op (N: LayerNorm,
    RMSNorm, or nothing when ``ln_weight`` is None, as ``ln_linear``), one output per weight,
    one backward for the group with its input gradient summed inside the op (top of the file).
    ``biases``: None, or one entry per weight (None where a projection has no bias)."""
    _check(x, weights, biases)
    if norm != "layer" and norm != "rms":
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    biases = list(biases) if biases is not None else [None] * len(weights)
    name = (
        resolve_backend(backend, x) if torch.compiler.is_compiling() else cached_backend(backend, x)
    )
    rows = x.numel() // max(x.shape[-1], 1)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, ln_weight, ln_bias, *weights, *biases)
    )
    if not grad and rows < x.shape[-1]:  # decode sizes: stream each weight once, copy none
        return tuple(
            ops.ln_linear(x, ln_weight, ln_bias, w, b, eps=eps, norm=norm, backend=name)
            for w, b in zip(weights, biases)
        )
    if name == "reference" or not grad:  # the weights concatenated, one ln_linear call
        out = ops.ln_linear(
            x,
            ln_weight,
            ln_bias,
            torch.cat(list(weights)),
            _cat_bias(weights, biases),
            eps=eps,
            norm=norm,
            backend=name,
        )
        return tuple(out.split([w.shape[0] for w in weights], dim=-1))
    return _Group.apply(
        x,
        ln_weight,
        ln_bias,
        eps,
        "none" if ln_weight is None else norm,
        FAMILY[name],
        ops._entry("ln_linear", name, x),
        tuple(b is not None for b in biases),
        *weights,
        *[b for b in biases if b is not None],
    )
