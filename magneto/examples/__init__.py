"""Runnable demonstrations of magneto (``python -m magneto.examples.<name>``).

``stability``: a learning-rate sweep across depth of deep, narrow decoder-only byte-level language
models in five norm schemes (Post-LN, Pre-LN, DeepNorm, Sub-LN with the plain init, Magneto) on
the installed Python standard library (``sweep`` runs it, ``stability_report`` draws it).

``image_classification``: a small vision Transformer on generated stripe images.

``speech_classification``: a speech encoder (convolutional subsampling, padding masks from
lengths) on generated filterbank utterances.

``multiway_overhead``: the time of a multiway (BEiT-3) layer against the plain layer.
"""
