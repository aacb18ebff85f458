"""Runnable demonstrations of magneto (``python -m magneto.examples.<name>``).

``stability``: deep, narrow decoder-only byte-level language models trained in four norm schemes
(Post-LN, Pre-LN, DeepNorm, Magneto's Sub-LN) on the installed Python standard library.

``image_classification``: a small vision Transformer on generated stripe images.

``speech_classification``: a speech encoder (convolutional subsampling, padding masks from
lengths) on generated filterbank utterances.

``multiway_overhead``: the time of a multiway (BEiT-3) layer against the plain layer.
"""
