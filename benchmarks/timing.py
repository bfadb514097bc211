"""Wall-clock helpers shared by the benchmark scripts (imported as ``timing`` from beside them)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn``."""
    return statistics.median(seconds(fn) for _ in range(repeats))


def wall_and_cpu_seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and this process's CPU seconds of one call of ``fn`` (CPU time is what a shared,
    oversubscribed machine distorts least: waiting for a core does not count)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0
