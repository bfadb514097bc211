"""Slow and hostile clients on a live loopback server (issue 13.2): bodies and headers are bounded
in time, refusals are counted, and everyone else keeps being served."""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from hansgate.service import protocol
from hansgate.service.limits import ServingOptions
from tests.service.live import serving

pytestmark = pytest.mark.timeout(180)
#: the header deadline over both of uvicorn's HTTP/1.1 protocols (httptools' when it is installed)
PROTOCOLS = pytest.mark.parametrize("http", [protocol.GuardedH11Protocol, pytest.param(
    protocol.GuardedHttpToolsProtocol, marks=pytest.mark.skipif(protocol.GuardedHttpToolsProtocol is None,
                                                                reason="httptools is not installed"))],
    ids=["h11", "httptools"])


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def counter(gw, name, **labels):
    v = gw.metrics.registry.get_sample_value(name, labels)
    return 0 if v is None else int(v)


def _connect(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    return s


def test_slow_bodies_do_not_deny_service(gateway_factory, concept_bundle):
    """256 connections trickling a body: 20 legitimate requests still succeed with p90 under 2 s,
    and the slow ones are refused (408, counted) once their deadline passes."""
    gw = gateway_factory(concept_bundle)
    # the same limit BentoML's max_concurrency had (256) and a short body deadline for the test
    opts = ServingOptions(body_timeout_s=3.0, body_min_rate=10**9, max_inflight=256)
    body = npy(np.full((1, 1, 8, 8), 0.5, np.float32))
    with serving(gw, opts) as base:
        port = int(base.rsplit(":", 1)[1])
        head = (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-npy\r\n"
                b"content-length: %d\r\n\r\n" % len(body))
        slow = [_connect(port, head + body[:1]) for _ in range(256)]  # first byte only, the rest never comes
        try:
            time.sleep(0.5)

            def one(_):
                t0 = time.perf_counter()
                r = httpx.post(base + "/predict", content=body, headers={"content-type": "application/x-npy"},
                               timeout=30)
                return r.status_code, time.perf_counter() - t0

            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(one, range(20)))
            statuses = [s for s, _ in results]
            p90 = float(np.percentile([t for _, t in results], 90))
            assert statuses == [200] * 20, statuses
            assert p90 < 2.0, p90
            # the slow ones are answered 408 and closed once their deadline passed
            answers = []
            for s in slow:
                s.settimeout(10)
                answers.append(s.recv(200))
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:40] for a in answers if
                                                                          not a.startswith(b"HTTP/1.1 408")][:3]
        finally:
            for s in slow:
                s.close()
        deadline = time.monotonic() + 10
        while counter(gw, "hansgate_rejected_requests_total", route="predict", reason="slow_body") < 256:
            assert time.monotonic() < deadline, {r: counter(gw, "hansgate_rejected_requests_total", route="predict",
                                                            reason=r) for r in ("slow_body", "bad_request", "overloaded")}
            time.sleep(0.1)


@PROTOCOLS
def test_slow_headers_are_timed_out_and_counted(gateway_factory, concept_bundle, http):
    gw = gateway_factory(concept_bundle)
    with serving(gw, ServingOptions(header_timeout_s=1.0), http) as base:
        port = int(base.rsplit(":", 1)[1])
        s = _connect(port, b"POST /predict HTTP/1.1\r\nhost: x\r\n")  # headers never complete
        idle = _connect(port, b"")  # never sends anything: closed without an answer
        try:
            s.settimeout(10)
            idle.settimeout(10)
            t0 = time.perf_counter()
            assert s.recv(200).startswith(b"HTTP/1.1 408")
            assert s.recv(200) == b""  # closed
            assert time.perf_counter() - t0 < 5
            assert idle.recv(200) == b""
        finally:
            s.close()
            idle.close()
        assert counter(gw, "hansgate_rejected_requests_total", route="connection", reason="slow_headers") == 1
        # a keep-alive connection gets a fresh deadline for its next request's headers
        with httpx.Client(base_url=base) as http:
            for _ in range(2):
                r = http.post("/predict", json={"tensor": np.zeros((1, 8, 8)).tolist()})
                assert r.status_code == 200
                time.sleep(0.6)


@PROTOCOLS
@pytest.mark.parametrize("where", ["one_header", "many_headers", "url"])
def test_oversized_headers_are_refused_and_counted(gateway_factory, concept_bundle, http, where):
    """Headers past ``max_header_bytes`` get 431 and a closed connection, before any body is read,
    whether sent at once or trickled (httptools has no bound of its own); the server keeps serving."""
    gw = gateway_factory(concept_bundle)
    big = b"a" * (protocol.settings.max_header_bytes + 1)
    head = {"one_header": b"POST /predict HTTP/1.1\r\nhost: x\r\nx-big: " + big + b"\r\n",
            "many_headers": b"POST /predict HTTP/1.1\r\nhost: x\r\n" + b"x-h: 0123456789abcdef\r\n" * 2000,
            "url": b"POST /predict?" + big + b" HTTP/1.1\r\nhost: x\r\n"}[where]
    with serving(gw, ServingOptions(header_timeout_s=30.0), http) as base:
        port = int(base.rsplit(":", 1)[1])
        s = _connect(port, head)  # the headers never end: only their size can end the wait
        try:
            s.settimeout(10)
            t0 = time.perf_counter()
            reply = s.recv(200)
            assert reply.startswith(b"HTTP/1.1 431"), reply
            assert time.perf_counter() - t0 < 5  # not the 30 s deadline
            while s.recv(4096):  # then closed
                pass
        finally:
            s.close()
        assert counter(gw, "hansgate_rejected_requests_total", route="connection", reason="large_headers") == 1
        assert counter(gw, "hansgate_predictions_total") == 0
        r = httpx.post(base + "/predict", json={"tensor": np.zeros((1, 8, 8)).tolist()}, headers={"x-ok": "a" * 4000})
        assert r.status_code == 200


def test_in_flight_limit_refuses_with_429_and_counts(gateway_factory, concept_bundle):
    gw = gateway_factory(concept_bundle)
    release = []
    original = gw.runtime.run

    def slow_run(x):
        while not release:
            time.sleep(0.01)
        return original(x)

    gw.runtime.run = slow_run
    body = npy(np.full((1, 1, 8, 8), 0.5, np.float32))
    with serving(gw, ServingOptions(max_inflight=2)) as base:
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(httpx.post, base + "/predict", content=body,
                                headers={"content-type": "application/x-npy"}, timeout=30) for _ in range(2)]
            time.sleep(0.5)
            r = httpx.post(base + "/predict", content=body, headers={"content-type": "application/x-npy"}, timeout=30)
            release.append(1)
            assert (r.status_code, r.json()["error"]) == (429, "overloaded")
            assert [f.result().status_code for f in futs] == [200, 200]
    assert counter(gw, "hansgate_rejected_requests_total", route="predict", reason="overloaded") == 1


@PROTOCOLS
def test_pipelined_requests_are_not_cut_by_the_header_deadline(gateway_factory, concept_bundle, http):
    """Each run outlasts the header deadline: the second request, whose headers came with the first,
    must not be timed out while it runs (httptools parses it at once and queues it; h11 later)."""
    gw = gateway_factory(concept_bundle)
    original = gw.runtime.run

    def slow_run(x):
        time.sleep(1.3)
        return original(x)

    gw.runtime.run = slow_run
    body = npy(np.full((1, 1, 8, 8), 0.5, np.float32))
    one = (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-npy\r\n"
           b"content-length: %d\r\n\r\n" % len(body)) + body
    with serving(gw, ServingOptions(header_timeout_s=1.0), http) as base:
        s = _connect(int(base.rsplit(":", 1)[1]), one + one)  # two requests in one write
        try:
            s.settimeout(10)
            data, t0 = b"", time.perf_counter()
            while chunk := s.recv(65536):  # both answers, then a quiet close once the connection idles
                data += chunk
            assert data.count(b"HTTP/1.1 200") == 2 and b"HTTP/1.1 408" not in data, data[-300:]
            assert time.perf_counter() - t0 < 5
        finally:
            s.close()
    assert counter(gw, "hansgate_rejected_requests_total", route="connection", reason="slow_headers") == 0
