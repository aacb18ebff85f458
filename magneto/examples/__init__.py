"""Runnable demonstrations of magneto (``python -m magneto.examples.<name>``).

``stability``: deep, narrow decoder-only byte-level language models trained in four norm schemes
(Post-LN, Pre-LN, DeepNorm, Magneto's Sub-LN) on the installed Python standard library.
"""
