"""hansgate.service.accepts: one new connection per wake-up, and a pause after each accept that grows with
the connections a worker holds, so workers sharing a listening socket share a burst of connections."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansgate.service import accepts
from hansgate.service.accepts import pause_s, spread_accepts
from tests.service.live import serving_app


@pytest.fixture(autouse=True)
def _restore_asyncio(monkeypatch):
    """``spread_accepts`` patches asyncio's loop class for the whole process: undo it after each test."""
    cls = asyncio.selector_events.BaseSelectorEventLoop
    monkeypatch.setattr(cls, "_accept_connection", cls._accept_connection)
    if hasattr(cls, "_hansgate_accept"):
        monkeypatch.setattr(cls, "_hansgate_accept", cls._hansgate_accept)
    monkeypatch.setattr(accepts, "_held", 0)


class _Counting(asyncio.Protocol):
    """Counts the connections the server accepted, and closes them (``accepts.held`` is left alone)."""

    made: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Counting.made.append(time.monotonic())
        transport.close()


class _Closing(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _pending(listener: socket.socket) -> int:
    """Accept (and close) whatever is still queued on ``listener``."""
    listener.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_one_accept_per_wake_leaves_the_rest_queued_for_other_workers():
    """Five connections queued: a wake-up of the patched loop takes one (asyncio's own took all five)."""
    spread_accepts()
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
    loop = asyncio.new_event_loop()
    try:
        loop._accept_connection(_Closing, listener, None, None, 100)  # type: ignore[attr-defined]
        loop.run_until_complete(asyncio.sleep(0.05))
        assert _pending(listener) == 4
    finally:
        for c in clients:
            c.close()
        loop.close()
        listener.close()


def test_spread_accepts_is_idempotent():
    """A second call wraps asyncio's own method again, not the first wrapper (one accept, not nested ones)."""
    spread_accepts()
    original = asyncio.selector_events.BaseSelectorEventLoop._hansgate_accept  # type: ignore[attr-defined]
    spread_accepts(pause_per_connection_s=0.001)
    assert asyncio.selector_events.BaseSelectorEventLoop._hansgate_accept is original  # type: ignore[attr-defined]


@given(st.integers(0, 100_000), st.floats(0, 1), st.floats(0, 1))
def test_pause_grows_with_held_connections_up_to_its_bound(connections, per_connection, bound):
    p = pause_s(connections, per_connection, bound)
    assert 0 <= p <= bound
    assert p <= pause_s(connections + 1, per_connection, bound)
    assert pause_s(0, per_connection, bound) == 0


def _serve_queued(n_clients: int, held: int, per_connection: float, bound: float, watch_s: list[float]):
    """Queue ``n_clients`` connections, serve them on a patched loop while this process holds ``held``
    connections; the number accepted at each time in ``watch_s`` (seconds after the server starts), and
    whether the listening socket is watched at the end."""
    spread_accepts(pause_per_connection_s=per_connection, max_pause_s=bound)
    accepts._held = held
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(n_clients)]
    _Counting.made = []
    loop = asyncio.new_event_loop()
    seen: list[int] = []

    async def run() -> bool:
        server = await loop.create_server(_Counting, sock=listener)
        t0 = time.monotonic()
        for t in watch_s:
            await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
            seen.append(len(_Counting.made))
        watched = listener.fileno() in loop._selector.get_map()  # type: ignore[attr-defined]
        server.close()
        return watched

    try:
        watched = loop.run_until_complete(run())
    finally:
        for c in clients:
            c.close()
        loop.close()
    return seen, watched


def test_a_worker_holding_no_connection_accepts_without_pausing():
    seen, watched = _serve_queued(3, held=0, per_connection=0.5, bound=1.0, watch_s=[0.3])
    assert seen == [3] and watched


def test_a_worker_holding_connections_pauses_after_each_accept_then_takes_the_next():
    """Held 4, 0.05 s each, bound 0.15 s: one accept, then the socket rests 0.15 s before the next."""
    seen, watched = _serve_queued(3, held=4, per_connection=0.05, bound=0.15, watch_s=[0.05, 2.0])
    assert seen == [1, 3]
    assert watched  # the rest ended: the socket is watched again
    gaps = [b - a for a, b in zip(_Counting.made, _Counting.made[1:])]
    assert min(gaps) >= 0.14


def test_closing_the_server_during_a_pause_does_not_watch_the_closed_socket_again():
    spread_accepts(pause_per_connection_s=0.1, max_pause_s=0.1)
    accepts._held = 2
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]
    loop = asyncio.new_event_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    async def run() -> None:
        server = await loop.create_server(_Closing, sock=listener)
        await asyncio.sleep(0.03)  # one accepted, the pause running
        server.close()
        await asyncio.sleep(0.3)  # past the pause

    try:
        loop.run_until_complete(run())
        assert errors == [] and listener.fileno() == -1
        assert not any(key.fileobj == -1 for key in loop._selector.get_map().values())  # type: ignore[attr-defined]
    finally:
        for c in clients:
            c.close()
        loop.close()


def test_the_gateway_protocol_reports_the_connections_it_holds():
    """``held`` follows the guarded HTTP protocol's connections: three open, then none."""
    from hansgate.service import protocol

    async def app(scope, receive, send):  # pragma: no cover - no request is sent
        raise AssertionError

    def wait_for(n: int) -> int:
        end = time.monotonic() + 10
        while accepts.held() != n and time.monotonic() < end:
            time.sleep(0.01)
        return accepts.held()

    with serving_app(app, protocol.guarded_protocol()) as port:
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert wait_for(3) == 3
        for c in clients:
            c.close()
        assert wait_for(0) == 0
