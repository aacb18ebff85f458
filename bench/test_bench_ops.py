"""pytest-benchmark suite of the ops at the report's training size, per backend.

    pytest bench/test_bench_ops.py                       # groups: one per op and pass
    pytest bench --benchmark-group-by=group --benchmark-timer=time.process_time  # 1 thread

Not part of the test run (pytest.ini collects tests/ only). The variants are the report's
(``magneto.report.speed``): ``magneto <backend>``, ``eager reference`` and the floors.
"""

import pytest
from _cases import SETTINGS, SIZES, params, run

from magneto.report import speed


@pytest.mark.parametrize("case, variant", params(speed.op_cases(SIZES, SETTINGS)))
def test_op(benchmark, case, variant):
    run(benchmark, case, variant)
