"""Which layers of a model are wrapped for sharded data parallelism, found by what the modules
are, not by the configuration flag that asked for it.

torchscale's ``fsdp=True`` makes every layer ``fairscale.nn.wrap(layer)``, which wraps only
inside fairscale's ``enable_wrap(wrapper_cls=...)`` context: built outside it (its own tests, a
model built for conversion) the flag leaves every layer a plain layer, which converts like any
other. A wrapped layer holds its parameters flattened or sharded, so it is refused until the
user unwraps it (a full state dict).

The wrapper types: fairscale's ``FullyShardedDataParallel`` and ``FlattenParamsWrapper`` (what
``enable_wrap`` hands ``wrap``), torch's ``FullyShardedDataParallel`` (FSDP1) and any module
``fully_shard`` has sharded (FSDP2: ``FSDPModule``). fairscale's ``checkpoint_wrapper`` (used
by ``checkpoint_activations``) only patches ``forward``: the layer stays what it was.
"""

from __future__ import annotations

import torch
from torch import nn


def _wrapper_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from fairscale.nn import FlattenParamsWrapper, FullyShardedDataParallel
    except ImportError:  # no fairscale, no fairscale wrappers
        pass
    else:
        types += [FullyShardedDataParallel, FlattenParamsWrapper]
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        types += [FullyShardedDataParallel, FSDPModule]
    return tuple(types)


def wrapped_layers(module: nn.Module) -> list[str]:
    """Qualified names of the outermost submodules of ``module`` that are sharded-data-parallel
    wrappers (``""`` for ``module`` itself); empty when nothing is wrapped."""
    types = _wrapper_types()
    found: list[str] = []

    def visit(name: str, child: nn.Module) -> None:
        if isinstance(child, types):
            found.append(name)
            return
        for sub, grandchild in child.named_children():
            visit(f"{name}.{sub}" if name else sub, grandchild)

    visit("", module)
    return found
