"""The one benchmark harness: timers, interleaved rounds, ratio statistics, machine info, tables.

Every benchmark of the project times through here (the report, ``bench/bench_cpu.py``,
``bench/bench_gpu.py``, the pytest-benchmark suites), so that a number means the same thing
wherever it is printed:

- A **timer** maps a zero-argument callable to the seconds of one measurement of it.
  ``cpu_timer(threads)`` times one call with the process's CPU time when torch runs one thread
  (other processes' load does not inflate it) and with wall time otherwise (CPU time would count
  threads waiting at barriers); ``gpu_timer()`` is ``triton.testing.do_bench``'s median, which
  synchronises and flushes L2 between repetitions.
- ``interleaved`` runs the variants of one case in **rounds**: each round measures every
  variant once, in an order rotated by one per round, so that slow phases of a shared machine
  and what one variant leaves in cache fall on all variants alike.
- A **ratio** is ``time(a) / time(b)`` taken per round, summarised by its median and its
  min–max over rounds (``ratio_stats``): a ratio measured side by side survives a machine
  that is uniformly slowed down, an absolute time does not.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

Timer = Callable[[Callable[[], object]], float]


def cpu_timer(threads: Optional[int] = None) -> Timer:
    """Seconds of one call: process CPU time with one thread, wall time with more."""
    threads = torch.get_num_threads() if threads is None else threads
    clock = time.process_time if threads == 1 else time.perf_counter

    def timer(fn: Callable[[], object]) -> float:
        start = clock()
        fn()
        return clock() - start

    timer.clock = "process CPU time" if threads == 1 else "wall time"
    return timer


def gpu_timer(warmup_ms: float = 5.0, rep_ms: float = 20.0) -> Timer:
    """Seconds per call, the median of ``triton.testing.do_bench`` (L2 flushed between calls)."""
    import triton.testing

    def timer(fn: Callable[[], object]) -> float:
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3

    timer.clock = f"triton.testing.do_bench median ({rep_ms:g} ms per measurement)"
    return timer


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    timer: Timer,
    warmup: int = 2,
    tick: Callable[[], None] = lambda: None,
    budget_s: Optional[float] = None,
    min_rounds: int = 3,
) -> dict[str, list[float]]:
    """Seconds of each variant per round: ``rounds`` measurements each, one of every variant per
    round, the order rotated by one each round, after ``warmup`` untimed calls of each.
    ``budget_s``: no round starts once the rounds so far took that long in wall time and at
    least ``min_rounds`` ran (a case whose every call takes seconds is measured well by fewer).
    ``tick()`` is called once per planned round (a progress bar)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        if budget_s is not None and r >= min_rounds and time.perf_counter() - start > budget_s:
            for _ in range(rounds - r):
                tick()
            break
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timer(variants[name]))
        tick()
    return times


@dataclasses.dataclass(frozen=True)
class RatioStats:
    """Per-round ratios ``num[i] / den[i]``: their median and min–max over the rounds."""

    median: float
    lo: float
    hi: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.lo:.3f}–{self.hi:.3f})"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> RatioStats:
    """Statistics of the per-round ratios of two variants timed in the same rounds."""
    if len(num) != len(den) or not num:
        raise ValueError(f"need equally many rounds of both, got {len(num)} and {len(den)}")
    ratios = [a / b for a, b in zip(num, den)]
    return RatioStats(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def time_stats(seconds: Sequence[float]) -> dict:
    """Median and min–max of one variant's per-round seconds."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """What a reader needs to judge the numbers: hardware, engines, versions, load and date."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        from magneto_kernels import _C

        info["kernel_isa"] = _C.cpu_capability()
        info["cpu_gemm_engine"] = _C.cpu_gemm_engine()
    except ImportError:
        info["kernel_isa"] = info["cpu_gemm_engine"] = None
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Lines of a markdown table; floats with 3 significant decimals, None as an em dash."""

    def cell(v: object) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines
