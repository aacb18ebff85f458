"""The parity-and-speed report: ``python -m magneto.report`` (``--help`` for the flags).

For the machine it runs on it prints and writes ``report-<device>-<dtype>-<date>.{md,json,png}``
(default under ``bench/results`` of the current directory):

- parity: every public op on every available backend against float64 (outputs and gradients,
  fp32 and bf16), whole models against torchscale 0.3.0 (``parity.py``);
- speed: each op and one Sub-LN encoder and decoder layer, training forward and
  forward+backward and ``no_grad`` decoding with a KV cache, as ratios measured side by side
  against the eager reference, torchscale, ``torch.compile`` of the reference and the floors
  (``speed.py``);
- memory: bytes saved for backward per token (``memory.py``);
- the machine (``harness.machine_info``).

``harness`` is the project's one benchmark harness (timers, interleaved rounds, ratio
statistics, machine info, tables). The markdown and the plot are generated from the JSON
(``render.py``).
"""
