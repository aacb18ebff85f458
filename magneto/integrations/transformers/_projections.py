"""Norms and projections as ``magneto_kernels.ln_linear`` calls: the projection adapters (one per
linear class), the group call site (one normalised input, several projections) and the output
projection (input activation, norm, projection, dropout and residual add as one call).

Every fused call of the integration is made here, by an adapter of ``PROJECTIONS``; what no
adapter accepts runs as the model's own module, fed by the norm module's output.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import activations
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights

import magneto_kernels
from magneto import fusion
from magneto.parallel.hf import (
    ColumnParallelBitLinear,
    ColumnParallelBitProjection,
    ColumnParallelProjection,
)
from magneto.parallel.layers import ColumnParallelLinear
from magneto_kernels import quant
from magneto_kernels.codes import GATED_ACTIVATIONS, QUANT_PACK_UNIT


@dataclasses.dataclass(frozen=True)
class MagnetoOptions:
    """How a patched model calls the fused ops.

    backend: the ``magneto_kernels`` backend of every call (None: the ops' own choice,
        ``MAGNETO_BACKEND`` or the fastest available).
    keep_weights: BitNet's offline projections keep transformers' weight resident beside the
        packed one (in-place edits of ``.weight`` are then packed again). False (the default):
        they keep only the packed weight and ``weight_scale`` (``PackedProjection``), 1/8 of the
        bf16 bytes, which is what a 2-bit model is for.
    output_projection: the model's head (``_head``): "dense" (the default: ``ln_linear``
        without a norm on its weight, magneto's GEMM engine), "int8" (per-row int8 weights and
        scales, not the dense head's logits by design) or None (transformers' ``lm_head``).
    """

    backend: Optional[str] = None
    keep_weights: bool = False
    output_projection: Optional[str] = "dense"


NormArgs = tuple  # (ln_weight, ln_bias, eps, norm): ln_linear's norm arguments
NO_NORM: NormArgs = (None, None, 0.0, "layer")


def norm_args(norm: Optional[nn.Module], rms_norm: Optional[type], x: Tensor) -> Optional[NormArgs]:
    """ln_linear's norm arguments for a norm module it can recompute (``magneto.fusion``'s rule,
    ``norm_arguments``: no hooks of any kind, LayerNorm / RMSNorm with a weight; or, without
    hooks, the family's RMSNorm class ``rms_norm``), None for one it cannot: that one then runs
    as a module, and the projections after it run unfused."""
    args = fusion.norm_arguments(norm, x)
    if args is not None:
        return args["ln_weight"], args["ln_bias"], args.get("eps", 0.0), args.get("norm", "layer")
    if rms_norm is not None and type(norm) is rms_norm and not fusion.has_hooks(norm):
        return norm.weight, None, norm.variance_epsilon, "rms"
    return None


def _ln_linear(x, nargs: NormArgs, weight, bias, options: MagnetoOptions, **kwargs) -> Tensor:
    ln_weight, ln_bias, eps, norm = nargs
    return magneto_kernels.ln_linear(
        x, ln_weight, ln_bias, weight, bias, eps=eps, norm=norm, backend=options.backend, **kwargs
    )


# ----------------------------------------------------------------------------------------------
# Projection adapters: how ln_linear runs a projection of one linear class.


class LinearProjection:
    """``nn.Linear``: ln_linear reads its weight and bias as they are."""

    @staticmethod
    def accepts(linear: nn.Module, x: Tensor, options) -> bool:
        """Whether this call can read the weight directly: ``magneto.fusion``'s rule
        (``fusable_linear``: no hooks of any kind, offloading hooks move it), and x's dtype."""
        return fusion.fusable_linear(linear) and linear.weight.dtype == x.dtype

    @staticmethod
    def call(x: Tensor, nargs: NormArgs, linear: nn.Module, options, **kwargs) -> Tensor:
        """``linear(norm(in_act(x)))`` with ln_linear's ``kwargs`` (input activation, dropout,
        residual) as one call."""
        return _ln_linear(x, nargs, linear.weight, linear.bias, options, **kwargs)

    @staticmethod
    def group(x: Tensor, nargs: NormArgs, linears, options, concat=False):
        """``[linear(norm(x)) for linear in linears]`` as one ``ln_linear_group``: x normalised
        once, its gradient summed inside the op; ``concat``: side by side in one tensor."""
        ln_weight, ln_bias, eps, norm = nargs
        outs = magneto_kernels.ln_linear_group(
            x,
            ln_weight,
            ln_bias,
            [linear.weight for linear in linears],
            [linear.bias for linear in linears],
            eps=eps,
            norm=norm,
            concat=concat,
            backend=options.backend,
        )
        return outs


class _BitNetProjection:
    """What the adapters of transformers' BitNet classes share (``magneto_kernels.quant``):
    offline, the weight packed into the kernels' layout once, at patch time (``prepare``), kept
    as a non-persistent buffer ``_magneto_packed``; then, unless the options keep it, the
    module's own weight dropped (``PackedProjection``). Kept, it is packed again when it has
    changed in place (its version counter) or when ``apply_magneto`` runs again."""

    @classmethod
    def prepare(cls, name: str, linear: nn.Module, options: MagnetoOptions) -> Optional[str]:
        """Packs an offline projection's weight and drops the module's own unless
        ``options.keep_weights``; returns why it cannot be fused (it then runs as its own
        module, its weight kept), or None. ValueError naming the module for a non-ternary
        weight."""
        if not cls.offline(linear):
            return None
        if isinstance(linear, PackedProjection):  # packed and dropped by an earlier call
            if options.keep_weights:
                linear.restore()
            return None
        if "_magneto_packed" not in linear._buffers:
            linear.register_buffer("_magneto_packed", None, persistent=False)
        linear._magneto_packed = None
        ternary = cls.ternary(linear, linear.weight.detach())
        if ternary.shape[1] % QUANT_PACK_UNIT:
            return f"in_features {ternary.shape[1]} is not a multiple of {QUANT_PACK_UNIT}"
        linear._magneto_name = name
        linear._magneto_packed = _pack(name, ternary)
        linear._magneto_version = linear.weight._version
        if not options.keep_weights:
            PackedProjection.drop(linear)
        return None

    @classmethod
    def accepts(cls, linear: nn.Module, x: Tensor, options) -> bool:
        if fusion.has_hooks(linear) or linear.rms_norm is not None or cls.dtype(linear) != x.dtype:
            return False
        backend = magneto_kernels.resolve_backend(options.backend, x)
        if backend not in quant.BACKENDS:  # no quantised kernels there: the module runs it
            why = f"runs on the {backend} backend, which has no quantised kernels"
            fusion.warn_unfused(type(linear).__name__, linear, why)
            return False
        if not cls.offline(linear):
            return True
        if getattr(linear, "_magneto_packed", None) is None:
            return False
        if linear._magneto_version != linear.weight._version:
            if isinstance(linear, PackedProjection):
                raise RuntimeError(
                    f"{linear._magneto_name}: its weight was changed in place after"
                    " apply_magneto dropped it (the module holds only the packed weight): load"
                    " new weights with load_state_dict, which packs them, or patch with"
                    " apply_magneto(model, keep_weights=True) to edit them in place"
                )
            cls.prepare(linear._magneto_name, linear, MagnetoOptions(keep_weights=True))
        return True

    @classmethod
    def call(cls, x: Tensor, nargs: NormArgs, linear: nn.Module, options, **kwargs) -> Tensor:
        offline = cls.offline(linear)
        return _ln_linear(
            x,
            nargs,
            linear._magneto_packed if offline else linear.weight,
            linear.bias,
            options,
            quant=cls.mode(linear),
            weight_scale=linear.weight_scale if offline else None,
            **kwargs,
        )

    @classmethod
    def group(cls, x: Tensor, nargs: NormArgs, linears, options, concat=False):
        """q/k/v or gate/up as one quantised ``ln_linear_group``: the normalised row quantised
        once for every projection; ``concat``: side by side in one tensor. Projections of
        different modes (a model converted in part) run one call each."""
        mode = cls.mode(linears[0])
        if any(cls.mode(linear) != mode for linear in linears):
            outs = tuple(cls.call(x, nargs, linear, options) for linear in linears)
            return torch.cat(outs, dim=-1) if concat else outs
        offline = cls.offline(linears[0])
        ln_weight, ln_bias, eps, norm = nargs
        return magneto_kernels.ln_linear_group(
            x,
            ln_weight,
            ln_bias,
            [linear._magneto_packed if offline else linear.weight for linear in linears],
            [linear.bias for linear in linears],
            eps=eps,
            norm=norm,
            quant=mode,
            weight_scales=cls.weight_scales(linears) if offline else None,
            concat=concat,
            backend=options.backend,
        )

    @staticmethod
    def weight_scales(linears) -> Tensor:
        """The group's ``weight_scales`` (one per projection), concatenated once and kept on the
        first projection while every projection holds the same ``weight_scale`` tensor, unchanged
        (its identity and version counter: ``.to()`` replaces it, ``load_state_dict`` and in-place
        edits change its version; either builds it again)."""
        scales = tuple(linear.weight_scale for linear in linears)
        versions = tuple(s._version for s in scales)
        cached = linears[0].__dict__.get("_magneto_scales")
        if (
            cached is not None
            and cached[1] == versions
            and len(cached[0]) == len(scales)
            and all(a is b for a, b in zip(cached[0], scales))
        ):
            return cached[2]
        joined = torch.cat([s.reshape(1) for s in scales])
        linears[0]._magneto_scales = (scales, versions, joined)
        return joined


def _pack(name: str, ternary: Tensor) -> Tensor:
    try:
        return quant.pack(ternary)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


class AutoBitLinearProjection(_BitNetProjection):
    """transformers' ``AutoBitLinear``: online (master weights, "bitnet_online") or offline
    (ternary weight and ``weight_scale``, "bitnet_offline")."""

    @staticmethod
    def offline(linear) -> bool:
        return not linear.online_quant

    @staticmethod
    def mode(linear) -> str:
        return "bitnet_online" if linear.online_quant else "bitnet_offline"

    @staticmethod
    def dtype(linear) -> torch.dtype:
        return linear.weight.dtype

    @staticmethod
    def ternary(linear, weight: Tensor) -> Tensor:
        return weight

    @staticmethod
    def weight_of(linear, ternary: Tensor) -> Tensor:
        return ternary.to(linear.weight.dtype)


class BitLinearProjection(_BitNetProjection):
    """transformers' ``BitLinear``: its weight in transformers' packed layout, an input format
    read once (``quant.unpack_hf``) and packed into the kernels' ("bitlinear")."""

    @staticmethod
    def offline(linear) -> bool:
        return True

    @staticmethod
    def mode(linear) -> str:
        return "bitlinear"

    @staticmethod
    def dtype(linear) -> torch.dtype:
        return linear.weight_scale.dtype

    @staticmethod
    def ternary(linear, weight: Tensor) -> Tensor:
        return quant.unpack_hf(weight, linear.out_features)

    @staticmethod
    def weight_of(linear, ternary: Tensor) -> Tensor:
        return pack_weights(ternary.to(torch.int8, copy=True))  # it packs in place


class PackedProjection:
    """An offline BitNet projection holding only its packed weight and ``weight_scale``: the
    class ``drop`` gives it (a subclass of its transformers class, so ``isinstance`` holds).

    ``weight`` stays, as a meta tensor: its shape, dtype, ``requires_grad`` and ``numel`` are
    transformers' (``num_parameters``, ``model.dtype``, the keys of ``state_dict``), with no
    data. What reads the data gets it back: ``state_dict`` (hence ``save_pretrained``) writes
    the weight transformers would, unpacked; ``load_state_dict`` packs what it loads; calling
    the module runs transformers' forward on the unpacked weight (a projection magneto cannot
    fuse, e.g. hooked); ``.to(dtype/device)`` moves the packed weight and scale. An in-place
    edit of ``weight`` has nowhere to go: the fused call refuses it, naming the module (keep the
    weights with ``apply_magneto(model, keep_weights=True)`` to edit them in place)."""

    _adapter = None  # the adapter of the transformers class
    _adapter_base = None  # the transformers class

    @classmethod
    def drop(cls, linear: nn.Module) -> None:
        linear.__class__ = _PACKED_OF[type(linear)]
        store = linear._parameters if "weight" in linear._parameters else linear._buffers
        store["weight"] = _meta_like(store["weight"])
        linear._magneto_version = linear.weight._version

    def restore(self) -> None:
        """Back to the transformers class with its weight resident (``keep_weights``)."""
        store = self._parameters if "weight" in self._parameters else self._buffers
        dense = self._dense_weight().requires_grad_(store["weight"].requires_grad)
        if store is self._parameters:
            dense = nn.Parameter(dense, dense.requires_grad)
        store["weight"] = dense
        self._magneto_version = self.weight._version
        self.__class__ = self._adapter_base

    def _dense_weight(self) -> Tensor:
        """The weight transformers would hold: the packed one unpacked (to its layout)."""
        ternary = quant.unpack(self._magneto_packed, torch.int8)
        return self._adapter.weight_of(self, ternary).to(self.weight.dtype)

    @contextlib.contextmanager
    def _resident(self):
        store = self._parameters if "weight" in self._parameters else self._buffers
        meta = store["weight"]
        store["weight"] = self._dense_weight()
        try:
            yield
        finally:
            store["weight"] = meta

    def forward(self, input: Tensor) -> Tensor:
        with self._resident():
            return super().forward(input)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weight" in destination:
            destination[prefix + "weight"] = self._dense_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is not None and tuple(weight.shape) == tuple(self.weight.shape):
            ternary = self._adapter.ternary(self, weight.detach().to(self._magneto_packed.device))
            self._magneto_packed = _pack(key, ternary)
            # the rest as torch does it (shape checks, missing and unexpected keys), the weight
            # as the meta tensor it stays
            state_dict = {**state_dict, key: _meta_like(weight.detach())}
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._magneto_version = self.weight._version  # its copy_ into meta counts as an edit

    def _apply(self, fn, recurse=True):
        store = self._parameters if "weight" in self._parameters else self._buffers
        meta = store.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=meta.dtype))  # the dtype fn gives the weight
            store["weight"] = _meta_like(meta, probe.dtype)
            self._magneto_version = self.weight._version
        return self


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """transformers' ``get_memory_footprint`` for a patched model (``apply_magneto`` gives it to
    the model's instances): the bytes of its parameters (and buffers) that hold data.
    transformers' counts every parameter's numel, so the meta ``weight`` a dropped projection
    keeps (``PackedProjection``) would count bytes no longer resident; the packed weights are
    buffers, counted with the others."""
    tensors = [*model.parameters(), *(model.buffers() if return_buffers else ())]
    return sum(t.nelement() * t.element_size() for t in tensors if t.device.type != "meta")


def _meta_like(weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    meta = torch.empty(weight.shape, dtype=dtype or weight.dtype, device="meta")
    if isinstance(weight, nn.Parameter):
        return nn.Parameter(meta, weight.requires_grad)
    return meta


class PackedAutoBitLinear(PackedProjection, AutoBitLinear):
    _adapter = AutoBitLinearProjection
    _adapter_base = AutoBitLinear


class PackedBitLinear(PackedProjection, BitLinear):
    _adapter = BitLinearProjection
    _adapter_base = BitLinear


_PACKED_OF = {AutoBitLinear: PackedAutoBitLinear, BitLinear: PackedBitLinear}


PROJECTIONS = {
    nn.Linear: LinearProjection,
    AutoBitLinear: AutoBitLinearProjection,
    BitLinear: BitLinearProjection,
    ColumnParallelLinear: ColumnParallelProjection,
    ColumnParallelBitLinear: ColumnParallelBitProjection,
    PackedAutoBitLinear: AutoBitLinearProjection,
    PackedBitLinear: BitLinearProjection,
}
"""Linear class (exactly: not its subclasses) -> its adapter (a tensor-parallel shard's:
``magneto.parallel.hf``). A projection of another class
(PEFT's LoRA layers, any wrapper) runs as its own module, fed by the norm module's output, and
``apply_magneto`` names it in a warning. An adapter with a ``prepare(name, linear, options)``
hook is prepared at patch time (BitNet's offline classes: packing, dropping the weight), which
may name a reason the projection stays unfused. The ``Packed`` classes are BitNet's offline
classes once their weight is dropped."""


def _adapter(linear: nn.Module, x: Tensor, options):
    adapter = PROJECTIONS.get(parametrize.type_before_parametrizations(linear))
    return adapter if adapter is not None and adapter.accepts(linear, x, options) else None


def project(
    module, x: Tensor, norm: Optional[nn.Module], linears: Sequence[nn.Module], *, concat=False
):
    """The group call site: ``[linear(norm(x)) for linear in linears]`` (q/k/v, gate/up, fc1),
    each fused with the norm where an adapter accepts it; ``concat``: the outputs concatenated
    along the last dimension instead, written side by side by the group op where one adapter
    takes every projection (no concatenation pass). ``module``: the patched module making the
    call (its options, its family's RMSNorm class)."""
    options = module._magneto_options
    nargs = norm_args(norm, module._rms_norm, x)
    adapters = [None if nargs is None else _adapter(linear, x, options) for linear in linears]
    if concat and len(linears) > 1 and adapters[0] is not None and len(set(adapters)) == 1:
        return adapters[0].group(x, nargs, linears, options, concat=True)
    outs = [None] * len(linears)
    for adapter in dict.fromkeys(a for a in adapters if a is not None):
        # the projections one adapter accepts: one group call, or one call for a single one
        picked = [i for i, a in enumerate(adapters) if a is adapter]
        if len(picked) == 1:
            outs[picked[0]] = adapter.call(x, nargs, linears[picked[0]], options)
        else:
            group = adapter.group(x, nargs, [linears[i] for i in picked], options)
            for i, y in zip(picked, group):
                outs[i] = y
    unfused = [i for i, a in enumerate(adapters) if a is None]
    if unfused:  # the norm's own output, computed once for every unfused projection
        h = x if norm is None else norm(x)
        for i in unfused:
            outs[i] = linears[i](h)
    if not concat:
        return outs
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


# ----------------------------------------------------------------------------------------------
# The output projection: input activation, norm, projection, dropout and residual add.


def _activation_name(act_fn: Optional[nn.Module]) -> Optional[str]:
    """The ops' name for a transformers activation module, None for one they do not have."""
    kind = type(act_fn)
    if kind is activations.GELUActivation:
        return "gelu"  # erf GELU, whether torch's or the Python formula
    if kind in (activations.GELUTanh, activations.NewGELUActivation):
        return "gelu_tanh"
    if kind in (nn.SiLU, activations.SiLUActivation):
        return "silu"
    if kind is nn.ReLU:
        return "relu"
    if kind is activations.ReLUSquaredActivation:
        return "relu2"
    return None


_GATED_OF = {gate: gated for gated, gate in GATED_ACTIVATIONS.items()}


def apply_activation(x: Tensor, act_fn: nn.Module, gated: bool) -> Tensor:
    if not gated:
        return act_fn(x)
    gate, up = x.chunk(2, dim=-1)
    return act_fn(gate) * up


def output_projection(
    module,
    x: Tensor,
    linear: nn.Module,
    *,
    norm: Optional[nn.Module] = None,
    act_fn: Optional[nn.Module] = None,
    gated: bool = False,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``residual + dropout(linear(norm(a)))`` with ``a = act_fn(x)``, or ``act_fn(gate)·up`` for
    ``gated`` (x = [gate | up]); one ln_linear where the adapter of ``linear`` and the norm allow
    it. An activation the ops lack runs as the model's module before the fused call."""
    in_act = None
    if act_fn is not None:
        name = _activation_name(act_fn)
        in_act = _GATED_OF.get(name) if gated else name
        if in_act is None:
            x, act_fn = apply_activation(x, act_fn, gated), None
    parallel = getattr(linear, "parallel_project", None)
    if parallel is not None:  # a row-parallel shard (magneto.parallel): its collectives too
        backend = module._magneto_options.backend
        return parallel(
            x,
            norm,
            input_activation=in_act,
            residual=residual,
            alpha=1.0,
            dropout_p=dropout_p,
            rows=None,
            backend=backend,
        )
    nargs = norm_args(norm, module._rms_norm, x)
    adapter = None if nargs is None else _adapter(linear, x, module._magneto_options)
    if adapter is not None:
        return adapter.call(
            x,
            nargs,
            linear,
            module._magneto_options,
            input_activation=in_act,
            residual=residual,
            dropout_p=dropout_p,
        )
    if act_fn is not None:
        x = apply_activation(x, act_fn, gated)
    if norm is not None:
        x = norm(x)
    y = magneto_kernels.dropout(linear(x), dropout_p)
    return y if residual is None else residual + y
