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
