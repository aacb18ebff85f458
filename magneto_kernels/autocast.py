"""The ops under ``torch.autocast``: which dtype each argument is cast to (one rule for every
backend), and the AutocastCPU / AutocastCUDA kernels of every op family.

The rule (docs/design.md, Numerics), following torch's autocast op lists:

- ``ln_linear`` is a linear (torch's lower-precision list): x, the linear's weight and bias and
  the residual are cast to the autocast dtype (``torch.get_autocast_dtype``), so the output
  is in that dtype, as ``F.linear``'s would be;
- the norm parameters (``ln_weight``, ``ln_bias``, ``weight`` and ``bias`` of the norm ops) are
  cast to float32, which the kernels take with rows of any dtype: the norm runs in float32
  arithmetic as torch runs ``layer_norm`` under autocast (its float32 list), and a
  model kept in float32 under autocast loses nothing in its norm parameters;
- ``layer_norm`` keeps x's dtype; ``add_layer_norm`` casts x and residual to the wider of the
  two (torch's promote list: ``x + residual`` of a bf16 sublayer output and a float32 residual
  stream is float32, as in torch.nn), so the residual stream stays in float32.

Only float32, bfloat16 and float16 tensors are cast (float64 ones stay, as torch's autocast
leaves them). The cast is recorded by autograd, so gradients reach the tensors in their own
dtype. The backward ops have no autocast kernel: they run on what the forward saved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from magneto_kernels.library import FAMILIES, SIGNATURES, _lib, get_op, op_name

_CASTABLE = (torch.float32, torch.bfloat16, torch.float16)

# Per op: the arguments cast to the autocast dtype, to float32, and promoted together.
_LOW = {
    "ln_linear": ("x", "weight", "bias", "residual"),
    "ln_linear_group": ("x", "weights", "biases"),
}
_FLOAT32 = {
    "layer_norm": ("weight", "bias"),
    "add_layer_norm": ("weight", "bias"),
    "ln_linear": ("ln_weight", "ln_bias"),
    "ln_linear_group": ("ln_weight", "ln_bias"),
}
_PROMOTE = {"add_layer_norm": ("x", "residual")}

OPS = tuple(_FLOAT32)
"""The forward ops that have an autocast rule (all of them)."""


def _to(t, dtype):
    if isinstance(t, (list, tuple)):  # a list argument: each of its tensors
        return [_to(item, dtype) for item in t]
    if isinstance(t, Tensor) and t.dtype in _CASTABLE and t.dtype != dtype:
        return t.to(dtype)
    return t


def cast(op: str, args: tuple, device_type: str) -> tuple:
    """``op``'s arguments (schema order, possibly without trailing defaults) cast by the rule
    above for an autocast region on ``device_type``."""
    names = SIGNATURES[op].names[: len(args)]
    args = dict(zip(names, args))
    low = torch.get_autocast_dtype(device_type)
    for name in _LOW.get(op, ()):
        args[name] = _to(args.get(name), low)
    for name in _FLOAT32.get(op, ()):
        args[name] = _to(args.get(name), torch.float32)
    promoted = [args[n] for n in _PROMOTE.get(op, ()) if isinstance(args.get(n), Tensor)]
    if promoted:
        wide = max((t.dtype for t in promoted), key=lambda d: torch.finfo(d).bits)
        for name in _PROMOTE[op]:
            args[name] = _to(args.get(name), wide)
    return tuple(args[n] for n in names)


def cast_if_enabled(op: str, args: tuple) -> tuple:
    """``cast`` when autocast is on for x's device (the reference backend's entry)."""
    x = args[0] if args else None
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        return cast(op, args, x.device.type)
    return args


def _register(op: str, family: str, device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    overload = get_op(op, family)

    def run(*args):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return overload(*cast(op, args, device_type))

    # The dispatcher's kernel, and the same rule where torch.compile traces the op (py_impl).
    name = op_name(op, family).split("::")[1]
    _lib.impl(name, lambda _keyset, *a: run(*a), key, with_keyset=True)
    overload.py_impl(getattr(torch._C.DispatchKey, key))(run)


for _family in FAMILIES:
    for _op in OPS:
        for _device_type in ("cpu", "cuda"):
            _register(_op, _family, _device_type)
