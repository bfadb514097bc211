"""Wall-clock, CPU and peak-memory helpers shared by the benchmark scripts (imported as ``timing``
from beside them)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Linux starts an exec'd child's ru_maxrss at its parent's high-water mark, so a benchmark that holds
# models would read its own peak for a child it starts directly: this process holds nothing
_USAGE_WRAPPER = ("import json, resource, subprocess, sys\n"
                  "rc = subprocess.call(sys.argv[2:])\n"
                  "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
                  "with open(sys.argv[1], 'w') as fh:\n"
                  "    json.dump({'cpu_seconds': u.ru_utime + u.ru_stime, 'peak_rss_mib': u.ru_maxrss / 1024}, fh)\n"
                  "sys.exit(rc)\n")


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


def run_with_usage(cmd: list[str], **kwargs: Any) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """``subprocess.run(cmd, **kwargs)`` through a small wrapper process: the completed process and the
    command's own CPU seconds and peak RSS in MiB (its process tree's largest, as ``RUSAGE_CHILDREN``
    reports). Output goes wherever ``kwargs`` send it; the usage travels in a file of its own."""
    with tempfile.TemporaryDirectory(prefix="usage-") as tmp:
        usage_file = Path(tmp) / "usage.json"
        proc = subprocess.run([sys.executable, "-c", _USAGE_WRAPPER, str(usage_file), *cmd], check=False, **kwargs)
        usage = json.loads(usage_file.read_text()) if usage_file.exists() else {"cpu_seconds": 0.0,
                                                                                "peak_rss_mib": 0.0}
    return proc, usage
