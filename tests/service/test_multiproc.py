"""hansgate.service.multiproc: one multiprocess directory per running gateway (issue 13.1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hansgate.service.multiproc import run_directory


def test_each_gateway_has_its_own_directory_and_stale_ones_go(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine, started = run_directory(tmp_path, os.getpid())
        other, _ = run_directory(tmp_path, sleeper.pid)
        assert mine != other and mine.parent == other.parent == tmp_path / "metrics"
        assert mine.name.startswith(f"{os.getpid()}-") and started > 0
        (mine / "counter_1.db").write_bytes(b"x")
        # the same gateway (another worker of it) gets the same directory, with its files
        assert run_directory(tmp_path, os.getpid())[0] == mine and (mine / "counter_1.db").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    stale = tmp_path / "metrics" / "999999999-1.000"  # an arbiter that no longer runs
    stale.mkdir()
    run_directory(tmp_path, os.getpid())
    assert not stale.exists() and not other.exists() and mine.exists()


def test_a_process_that_does_not_run_has_no_directory(tmp_path):
    with pytest.raises(RuntimeError):
        run_directory(tmp_path, 999999999)
