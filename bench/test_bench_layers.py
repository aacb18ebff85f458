"""pytest-benchmark suite of one Sub-LN encoder and decoder layer (training size, forward and
forward+backward) and of decoding steps, per backend, beside torchscale and the floors.

    pytest bench/test_bench_layers.py --benchmark-group-by=group

Not part of the test run (pytest.ini collects tests/ only).
"""

import pytest
from _cases import SETTINGS, SIZES, params, run

from magneto.report import speed


@pytest.mark.parametrize(
    "case, variant",
    params(speed.layer_cases(SIZES, SETTINGS) + speed.decode_cases(SIZES, SETTINGS)),
)
def test_layer(benchmark, case, variant):
    run(benchmark, case, variant)
