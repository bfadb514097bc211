"""Real ``hansgate serve`` processes (BentoML) on loopback: metrics isolation between gateways,
restart visibility, bounded labels and slow clients (issue 13.1, 13.2, 13.4)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.live import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(400)


class Served:
    def __init__(self, bundle: Path, home: Path, state: Path, log: Path, workers: int = 1, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        e = dict(os.environ, BENTOML_HOME=str(home), HANSGATE_STATE_DIR=str(state), HANSGATE_PROVIDER="cpu",
                 HANSGATE_ORT_THREADS="1", BENTOML_DO_NOT_TRACK="True", HANSGATE_RECEIPT_KEY="k" * 32, **env)
        e.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "hansgate.cli", "serve", str(bundle), "--port",
                                      str(self.port), "--host", "127.0.0.1", "--workers", str(workers)], cwd=ROOT, env=e,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "gateway not ready in 120 s"
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    def predict(self, n: int) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            for i in range(n):
                r = http.post("/predict", json={"tensor": np.full((1, 8, 8), (i % 10) / 10).tolist()})
                assert r.status_code == 200, r.text

    def metric(self, name: str) -> tuple[float, int]:
        """(sum of a metric's samples, number of lines on /metrics)."""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith(name + "{") or line.startswith(name + " "))
        return total, len(text.splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _slow_bodies_leave_room(served: Served) -> None:
    """256 connections that send one byte of a body and stop: 20 legitimate requests (4 at a time) still
    succeed with p90 under 2 s, and the slow ones get 408 (issue 13.2)."""
    body = npy(np.full((1, 1, 8, 8), 0.5, np.float32))
    head = (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-npy\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    slow = []
    for _ in range(256):
        s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        s.sendall(head + body[:1])
        slow.append(s)
    try:
        def one(_):
            t0 = time.perf_counter()
            r = httpx.post(served.base + "/predict", content=body, headers={"content-type": "application/x-npy"},
                           timeout=30)
            return r.status_code, time.perf_counter() - t0

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(20)))
        assert [s for s, _ in results] == [200] * 20
        assert float(np.percentile([t for _, t in results], 90)) < 2.0
        for s in slow[:4]:
            assert s.recv(100).startswith(b"HTTP/1.1 408")
    finally:
        for s in slow:
            s.close()


def test_slow_bodies_leave_room_when_two_workers_pace_their_accepts(concept_bundle, tmp_path):
    """With two workers each pauses after an accept for up to 2 ms as it holds more connections
    (``service.accepts``): 256 slow connections must not hold back the legitimate ones."""
    served = Served(concept_bundle, tmp_path / "bentoml", tmp_path / "state", tmp_path / "w2.log", workers=2,
                    HANSGATE_BODY_TIMEOUT_S="3")
    try:
        _slow_bodies_leave_room(served)
    finally:
        served.stop()


def test_gateways_keep_their_own_metrics_and_a_restart_is_visible(concept_bundle, tmp_path):
    home, state = tmp_path / "bentoml", tmp_path / "state"  # shared by both gateways, as by default
    a = Served(concept_bundle, home, state, tmp_path / "a.log", HANSGATE_BODY_TIMEOUT_S="3")
    b = None
    try:
        a.predict(20)
        assert a.metric("hansgate_predictions_total")[0] == 20

        # 13.4: random paths add no series (BentoML's path-labelled metrics are off)
        lines_before = a.metric("hansgate_predictions_total")[1]
        with httpx.Client(base_url=a.base, timeout=10) as http:
            for i in range(100):
                assert http.get(f"/x{i}/{os.urandom(4).hex()}").status_code == 404
        assert a.metric("hansgate_predictions_total")[1] == lines_before

        # 13.2: 256 slow-body connections; 20 legitimate requests still succeed, p90 < 2 s
        _slow_bodies_leave_room(a)

        # 13.1: a second gateway with the same BENTOML_HOME and state dir leaves A's counters alone
        b = Served(concept_bundle, home, state, tmp_path / "b.log")
        b.predict(3)
        assert a.metric("hansgate_predictions_total")[0] == 40
        assert b.metric("hansgate_predictions_total")[0] == 3
        started_a = a.metric("hansgate_start_time_seconds")[0]
        a.stop()
        # a restart: counters begin again at zero and the start time moves on (a visible reset)
        a = Served(concept_bundle, home, state, tmp_path / "a2.log")
        assert a.metric("hansgate_predictions_total")[0] == 0
        assert a.metric("hansgate_start_time_seconds")[0] > started_a
        assert b.metric("hansgate_predictions_total")[0] == 3
    finally:
        a.stop()
        if b is not None:
            b.stop()
