"""One Prometheus multiprocess directory per running gateway, under its state directory.

prometheus-client's multiprocess mode keeps each worker's values in files of one
directory and sums them at scrape time. BentoML points every server at the same
``$BENTOML_HOME/prometheus_multiproc_dir`` and empties it when a server starts, so a
second gateway on the machine wiped the first one's counters and then exported its own.

Each gateway (one ``bentoml serve`` arbiter and its workers) therefore gets
``<state dir>/metrics/<arbiter pid>-<arbiter start time>``: its workers share it (so a
worker that dies and is restarted keeps its counts, summed from the files it left), another
gateway never touches it, and directories of arbiters that no longer run are removed when
a gateway starts. A restart of the whole gateway is a new directory: its counters start at
zero, which Prometheus treats as a counter reset (``rate``/``increase`` handle it), and
``hansgate_start_time_seconds`` changes, so the reset is visible rather than silent.

``use_own_directory`` must run in a worker before the first metric value is created (it
sets ``PROMETHEUS_MULTIPROC_DIR``, which prometheus-client reads when it creates a value
and when it collects); ``service.service`` calls it first thing in the worker.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

__all__ = ["ENV", "run_directory", "use_own_directory"]

log = logging.getLogger("hansgate.service")

ENV = "PROMETHEUS_MULTIPROC_DIR"


def _start_time(pid: int) -> float | None:
    """A process's start time (psutil), or ``None`` when it no longer runs."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def run_directory(state_dir: Path, owner_pid: int) -> tuple[Path, float]:
    """The directory of the gateway run owned by ``owner_pid`` (created; stale siblings removed)
    and the owner's start time (unix seconds)."""
    started = _start_time(owner_pid)
    if started is None:
        raise RuntimeError(f"process {owner_pid} does not run")
    root = state_dir / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    mine = root / f"{owner_pid}-{started:.3f}"
    with open(root / ".lock", "a") as lock:  # the workers of one gateway start together
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for d in root.iterdir():
                if not d.is_dir() or d == mine:
                    continue
                pid, _, stamp = d.name.partition("-")
                try:
                    alive = _start_time(int(pid))
                    if alive is not None and f"{alive:.3f}" == stamp:
                        continue  # another running gateway's directory
                except ValueError:
                    continue  # not ours
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed the metrics of a gateway that no longer runs: %s", d)
            mine.mkdir(exist_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return mine, started


def use_own_directory(state_dir: Path, owner_pid: int | None = None) -> tuple[Path, float]:
    """Point this process's prometheus-client at its gateway's own directory (see module doc).

    ``owner_pid``: the gateway's arbiter (default: this worker's parent process).
    """
    path, started = run_directory(state_dir, os.getppid() if owner_pid is None else owner_pid)
    os.environ[ENV] = str(path)
    return path, started
