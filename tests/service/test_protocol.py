"""hansgate.service.protocol: one new connection per wake-up (``spread_accepts``), so workers sharing a socket
share them; ``install`` serves with the guarded httptools protocol when httptools is there."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hansgate.service import protocol
from hansgate.service.protocol import spread_accepts


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
    spread_accepts()
    assert asyncio.selector_events.BaseSelectorEventLoop._hansgate_accept is original  # type: ignore[attr-defined]


def test_install_serves_with_the_guarded_protocol(monkeypatch):
    """uvicorn's ``http="auto"`` resolves to the guarded protocol: httptools' (parsing in C) when it is
    installed, h11's otherwise; both carry the header deadline."""
    import uvicorn.config
    from uvicorn.importer import import_from_string

    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", uvicorn.config.HTTP_PROTOCOLS["auto"])
    monkeypatch.setattr(protocol.settings, "header_timeout_s", protocol.settings.header_timeout_s)
    monkeypatch.setattr(protocol.settings, "on_refusal", protocol.settings.on_refusal)
    protocol.install(3.0)
    chosen = import_from_string(uvicorn.config.HTTP_PROTOCOLS["auto"])
    assert chosen is protocol.guarded_protocol()
    assert issubclass(chosen, protocol._HeaderDeadline) and protocol.settings.header_timeout_s == 3.0
    try:
        import httptools  # noqa: F401
    except ImportError:
        pytest.skip("httptools is not installed: h11's protocol is the only one")
    assert chosen is protocol.GuardedHttpToolsProtocol
