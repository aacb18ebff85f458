"""A labelled STAND-IN for timm, not the real package: only ``timm.models.layers.drop_path``,
the one timm function torchscale 0.3.0 imports (README.md here says why).

This folder holds a ``timm`` package; ``use_if_missing()`` puts the folder on ``sys.path`` when
no real timm is importable, so that ``import torchscale`` works beside a CPU-only torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys

PATH = os.path.dirname(os.path.abspath(__file__))


def use_if_missing() -> bool:
    """Make ``import timm`` find the stand-in unless a timm is importable; True if it did."""
    if importlib.util.find_spec("timm") is not None:
        return False
    sys.path.insert(0, PATH)
    return True
