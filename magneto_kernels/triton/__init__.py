"""Triton kernels of the ``triton`` op family (see ``magneto_kernels.library``).

Importing this package registers the kernels. Under ``TRITON_INTERPRET=1`` (set before import)
they run on CPU tensors in Triton's interpreter.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
