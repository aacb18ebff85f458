"""Integrations of magneto's fused ops into models of other libraries.

- ``magneto.integrations.transformers``: Hugging Face ``transformers`` Llama, BitNet, Kosmos-2
  and Kosmos-2.5 (``apply_magneto(model)``). Imported on its own, so that magneto does not
  need ``transformers`` installed.
"""
