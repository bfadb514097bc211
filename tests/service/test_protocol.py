"""hansgate.service.protocol: ``install`` serves with the guarded httptools protocol when httptools is there
(the header deadline itself is tested over HTTP in ``test_slow_clients``)."""

from __future__ import annotations

import pytest

from hansgate.service import protocol


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


@pytest.mark.skipif(protocol.GuardedHttpToolsProtocol is None, reason="httptools is not installed")
def test_bodies_under_the_high_water_mark_never_pause_the_socket(monkeypatch):
    """uvicorn paused reading at 64 KiB of buffered body (a 200 KB body: two epoll changes per request); the
    gateway's protocol pauses only past ``body_high_water_bytes``, and bodies arrive whole either way."""
    import asyncio
    import hashlib

    import httpx
    from uvicorn.protocols.http.flow_control import FlowControl

    from tests.service.live import serving_app

    pauses: list[int] = []
    original = FlowControl.pause_reading
    monkeypatch.setattr(FlowControl, "pause_reading", lambda self: (pauses.append(1), original(self))[1])
    monkeypatch.setattr(protocol.settings, "body_high_water_bytes", 1024 * 1024)

    async def app(scope, receive, send):
        await asyncio.sleep(0.2)  # the body buffers in the protocol meanwhile
        digest, more = hashlib.sha256(), True
        while more:
            message = await receive()
            digest.update(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": digest.hexdigest().encode()})

    with serving_app(app, protocol.GuardedHttpToolsProtocol) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            small = bytes(range(256)) * 800  # 200 KB
            for _ in range(5):
                assert client.post("/", content=small).text == hashlib.sha256(small).hexdigest()
            assert pauses == []  # uvicorn's own mark paused each of these
            large = bytes(range(256)) * 16 * 1024  # 4 MiB: past the mark, the socket pauses as before
            assert client.post("/", content=large).text == hashlib.sha256(large).hexdigest()
            assert pauses
