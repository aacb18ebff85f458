"""The report's cases (``magneto.report.speed``) as pytest-benchmark parameters.

Sizes: the report's defaults for the device, or its tiny ones with ``MAGNETO_BENCH_SIZES=quick``.
torch.compile comparators are left out (minutes of compiling for a benchmark suite).
"""

from __future__ import annotations

import os

import torch

import magneto_kernels as mk
from magneto.report import cli, harness, speed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = cli.SIZES[os.environ.get("MAGNETO_BENCH_SIZES", DEVICE)]
SETTINGS = speed.Settings(
    device=DEVICE,
    dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32,
    backends=[
        b
        for b, why in mk.available_backends(DEVICE).items()
        if why is None and b != "reference" and not (DEVICE == "cpu" and b == "triton")
    ],
    compile=False,
    rounds=1,
    timer=harness.cpu_timer(),
)


def params(cases: list[speed.Case]) -> list:
    """(case, variant) pairs; ids ``<case> <pass> | <variant>``, groups one per case and pass,
    so that the default ``--benchmark-group-by=group`` compares the variants (backends, eager
    reference, floors; ``copy`` is x copied once, the bandwidth yardstick) of each op side by
    side."""
    import pytest

    return [
        pytest.param(case, name, id=f"{case.name} {case.pass_} | {name}".replace("×", "x"))
        for case in cases
        for name in case.variants
    ]


def run(benchmark, case: speed.Case, variant: str) -> None:
    benchmark.group = f"{case.name} {case.pass_}"
    benchmark.extra_info.update(harness.machine_info(DEVICE))
    benchmark(case.variants[variant])
