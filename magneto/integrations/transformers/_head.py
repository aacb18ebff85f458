"""The model's output projection (``lm_head``) under ``apply_magneto``'s ``output_projection``:

- ``"dense"`` (the default): magneto's ``ln_linear`` without a norm on the head's own weight and
  bias: the GEMM engine of the backend, which on CPU runs the few-row kernel at decode sizes
  (the weight streamed once, where a BLAS packs it first) and measures its engines otherwise
  (in bf16 on a CPU without bf16 arithmetic, float32 GEMMs on widened operands instead of
  torch's generic loop). Its logits are transformers' up to the order of the sums.
- ``"int8"``: per-output-row int8 weights, for decoding. Once BitNet's projections read 2 bits
  per weight, the dense head (128256 × 2560 at 2B-4T's sizes) is most of a decoded token's
  bytes; int8 halves them. Per row n of the head's weight W:

      s_n = max_k |W_nk| / 127, rounded to W's dtype;   q_nk = clamp(round(W_nk / s_n), -127, 127)
      logits = (x @ q.T) · s   (+ bias)

  run by magneto's op ``magneto_kernels.int8_head`` (x, s, the bias and the logits in one dtype;
  q int8): the products summed in float32, multiplied by s (and the bias added) in float32,
  rounded to the logits' dtype once; on CPU tensors its C++ kernel (csrc/cpu/int8_head.h), which
  streams the int8 weight once for every row of x. It is not transformers' result by design (the
  logits move by the weights' rounding, so a near-tied greedy choice may flip). The int8 weight
  and scales are non-persistent buffers, quantised again when the weight has changed in place
  (its version counter).
- ``None``: transformers' own head.

Either form is a class given to the head's ``nn.Linear`` instance, which keeps its dense weight
(tied to the embedding in most models) and its ``state_dict``. A head that is not a plain
``nn.Linear`` (a PEFT wrapper, say) stays the model's own under ``"dense"`` (named in
``apply_magneto``'s warning) and is refused by ``"int8"``. The final norm runs as the model's
module, as it does unpatched (its output is the model's last hidden state). A head replaced
later (``resize_token_embeddings``) is transformers' again.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import magneto_kernels
from magneto_kernels import int8_head

QMAX = 127
KINDS = (None, "dense", "int8")


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """The head's int8 weight (N, K) and scales (N, in ``weight``'s dtype): the formula above,
    the scale computed in float32 and rounded to the weight's dtype before it divides."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(weight.dtype).tiny)
    scale = scale.to(weight.dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale


class Int8OutputProjection(nn.Linear):
    """The class ``quantize`` gives an ``nn.Linear`` head: its forward is the int8 formula."""

    def _quantize(self) -> None:
        self._magneto_int8, self._magneto_int8_scale = int8_rows(self.weight)
        self._magneto_version = self.weight._version

    def forward(self, x: Tensor) -> Tensor:
        if self._magneto_version != self.weight._version:
            self._quantize()
        if x.dtype != self.weight.dtype:
            raise TypeError(f"the int8 head runs in {self.weight.dtype}, got x in {x.dtype}")
        return int8_head(x, self._magneto_int8, self._magneto_int8_scale, self.bias)


class DenseOutputProjection(nn.Linear):
    """The class ``"dense"`` gives an ``nn.Linear`` head: its forward is ``ln_linear`` without a
    norm (one counted fused call), on the backend of its ``MagnetoOptions``, which it carries as
    the patched blocks do."""

    def forward(self, x: Tensor) -> Tensor:
        return magneto_kernels.ln_linear(
            x, None, None, self.weight, self.bias, backend=self._magneto_options.backend
        )


def quantize(head: nn.Module) -> None:
    """Gives ``head`` (the model's output projection, an ``nn.Linear``) the int8 forward."""
    if type(head) is not nn.Linear:
        raise ValueError(
            f"output_projection='int8' needs the output projection to be an nn.Linear,"
            f" got {type(head).__name__}"
        )
    if not head.weight.is_floating_point() or head.weight.device.type != "cpu":
        raise ValueError(
            "output_projection='int8' runs magneto's CPU kernel (magneto_kernels.int8_head): the"
            f" head's weight must be a floating CPU tensor, got {head.weight.dtype} on"
            f" {head.weight.device}"
        )
    for name in ("_magneto_int8", "_magneto_int8_scale"):
        head.register_buffer(name, None, persistent=False)
    head.__class__ = Int8OutputProjection
    head._quantize()


def restore(head: nn.Module) -> None:
    """Back to transformers' head (``output_projection=None`` on a patched model)."""
    if type(head) is Int8OutputProjection:
        del head._magneto_int8, head._magneto_int8_scale
    elif type(head) is DenseOutputProjection:
        del head._magneto_options
    else:
        return
    head.__class__ = nn.Linear


def set_output_projection(model: nn.Module, settings) -> Optional[str]:
    """Applies ``settings.output_projection`` (``settings``: the ``MagnetoOptions``) to the
    model's head; returns, for ``apply_magneto``'s warning, the head that ``"dense"`` leaves to
    transformers, else None."""
    kind = settings.output_projection
    if kind not in KINDS:
        raise ValueError(f"output_projection must be None, 'dense' or 'int8', got {kind!r}")
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        if kind == "int8":
            raise ValueError(f"{type(model).__name__} has no output projection to quantise")
        return None
    restore(head)
    if kind == "int8":
        quantize(head)
    elif kind == "dense":
        if type(head) is not nn.Linear:
            return f"output projection ({type(head).__name__})"
        head._magneto_options = settings
        head.__class__ = DenseOutputProjection
    return None
