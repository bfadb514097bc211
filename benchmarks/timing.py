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
