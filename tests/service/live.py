"""A live loopback server for the service tests: uvicorn (with the gateway's guarded HTTP
protocol) serving ``create_app`` over an in-process gateway, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving_app(app, http) -> Iterator[int]:
    """The port on which uvicorn serves a plain ASGI ``app`` with the protocol class ``http`` until the block
    ends (bounded start and stop)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=http, lifespan="off",
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextmanager
def serving(gw, options=None, http=None) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``gw`` until the block ends (bounded start and stop); ``http``: the
    protocol class (default: the one the gateway serves with, ``protocol.guarded_protocol()``)."""
    import uvicorn

    from hansgate.service import protocol
    from hansgate.service.app import create_app

    opts = options
    protocol.settings.header_timeout_s = opts.header_timeout_s if opts is not None else 10.0
    protocol.settings.on_refusal = lambda reason: gw.metrics.reject("connection", reason)
    app = create_app(lambda: gw, opts)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http or protocol.guarded_protocol(), lifespan="off",
                            log_level="error", timeout_keep_alive=5, backlog=2048)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        httpx.get(base + "/openapi.json", timeout=10)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        protocol.settings.on_refusal = None
