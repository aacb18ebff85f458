"""Compatibility with other Transformer libraries (torchscale 0.3.0: ``magneto.compat.torchscale``).

torchscale itself is imported only when a conversion runs.
"""

from magneto.compat.torchscale import (
    config_from_torchscale,
    from_torchscale,
    to_torchscale,
    to_torchscale_state_dict,
    torchscale_args,
)

__all__ = [
    "from_torchscale",
    "to_torchscale",
    "to_torchscale_state_dict",
    "config_from_torchscale",
    "torchscale_args",
]
