"""A header deadline for uvicorn's HTTP/1.1 protocols (slow-header clients, "slowloris").

uvicorn times out a keep-alive connection only while it is idle after a response, and
any byte re-arms nothing: a client that sends one header byte every few seconds, or that
opens a connection and sends nothing, holds it (a file descriptor, a task, buffers)
forever. ``GuardedH11Protocol`` and ``GuardedHttpToolsProtocol`` (the same deadline over uvicorn's
h11 and httptools protocols) give every request's headers ``header_timeout_s`` from
the moment the connection opens or the previous response completes; a connection that
has not delivered complete headers by then is answered ``408`` and closed, and the
refusal is reported through ``on_refusal`` (the gateway counts it as
``hansgate_rejected_requests_total{route="connection", reason="slow_headers"}``). An idle
keep-alive connection that sent nothing is closed silently, as uvicorn does.

Each connection's start and end is reported to ``service.accepts``, which paces how fast a
worker takes new connections by how many it holds.

The gateway serves with httptools' protocol when httptools is installed (``guarded_protocol``):
it parses requests and writes responses in C; h11 does both in Python, a large share of the CPU
a single-row request costs.

Bodies are bounded in ``service.app`` (a read deadline per request), which knows the route.

BentoML builds the uvicorn ``Config`` of each worker itself; ``install`` points uvicorn's
``http="auto"`` at the guarded protocol, and must run in the worker before uvicorn starts
(``service.service`` does it when BentoML imports the service).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from hansgate.service import accepts

__all__ = ["GuardedH11Protocol", "GuardedHttpToolsProtocol", "guarded_protocol", "install", "settings"]

log = logging.getLogger("hansgate.service")

_BODY_408 = b'{"error":"slow_headers","detail":"request headers did not arrive in time"}'
_RESPONSE_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(_BODY_408), _BODY_408))
_BODY_431 = b'{"error":"large_headers","detail":"request headers are larger than the gateway accepts"}'
_RESPONSE_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY_431), _BODY_431))


class _Settings:
    header_timeout_s: float = 10.0
    #: bytes a request's headers may take (h11's own default bound; httptools has none, so without it
    #: a client could stream headers into memory for the whole deadline)
    max_header_bytes: int = 16 * 1024
    #: body bytes buffered before reading from the socket pauses (uvicorn's own limit is 64 KiB: a 200 KB
    #: body paused and resumed the socket, two epoll changes, on every request). The gateway's routes read
    #: the whole body at once anyway, bounded by ``HANSGATE_MAX_BODY_BYTES``, so this only decides
    #: how much of it waits in the protocol rather than in the route's buffer.
    body_high_water_bytes: int = 1024 * 1024
    on_refusal: Callable[[str], None] | None = None


settings = _Settings()


class _HeaderDeadline(asyncio.Protocol):
    """A deadline for each request's headers, over either of uvicorn's HTTP/1.1 protocols (mixed in
    before it: every method calls the protocol's own)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: object = None
        self._partial = False
        self._header_bytes = 0
        self._too_large = False

    def _arm(self) -> None:
        self._disarm()
        self._partial = False
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(settings.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        accepts.connection_opened()
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        accepts.connection_closed()
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting = self._header_timer is not None
        if waiting:
            self._partial = True
            self._header_bytes += len(data)
        super().data_received(data)
        complete = self.cycle is not None and self.cycle is not self._seen_cycle
        if complete:
            self._seen_cycle = self.cycle  # a new request's headers are complete
            self._disarm()
        if waiting and not complete and self._header_bytes > settings.max_header_bytes \
                and not self.transport.is_closing():
            self._refuse(_RESPONSE_431, "large_headers")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error: 431 (counted) where the error is the header bound
        (h11's own, equal to ours, or the httptools count below), else uvicorn's 400."""
        if self._too_large or (self._header_timer is not None and self._header_bytes > settings.max_header_bytes):
            self._refuse(_RESPONSE_431, "large_headers")
        else:
            super().send_400_response(msg)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        # httptools parses pipelined requests as they arrive and queues them; h11 parses the next
        # one only now (inside this call): either way a request with complete headers runs next
        queued = bool(getattr(self, "pipeline", None))
        super().on_response_complete()  # type: ignore[misc]
        if self.transport.is_closing() or queued:
            return
        if self.cycle is not None and self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle  # a pipelined request's headers were already buffered
            return
        self._arm()  # the next request's headers get their own deadline

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._partial:
            self._refuse(_RESPONSE_408, "slow_headers")
        else:
            self.transport.close()

    def _refuse(self, response: bytes, reason: str) -> None:
        """Count ``reason``, answer ``response`` and close the connection (counted first: a client
        that reads the answer finds the refusal already counted)."""
        self._disarm()
        if settings.on_refusal is not None:
            try:
                settings.on_refusal(reason)
            except Exception:  # counting must never break the server
                log.exception("counting a %s refusal failed", reason)
        try:
            self.transport.write(response)
        except (OSError, RuntimeError):
            pass
        self.transport.close()


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with a deadline for each request's headers."""


class _HeadersTooLarge(Exception):
    """Raised inside the parser's callbacks to stop it at the header bound."""


GuardedHttpToolsProtocol: type[asyncio.Protocol] | None
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _GuardedHttpTools(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol (the C parser llhttp) with a deadline for each request's headers,
        and a bound on their size, counted as the parser reads them (llhttp has none of its own; a
        pipelined request's headers are parsed while the one before it runs)."""

        _message_header_bytes = 0

        def _count(self, n: int) -> None:
            self._message_header_bytes += n
            if self._message_header_bytes > settings.max_header_bytes:
                self._too_large = True
                raise _HeadersTooLarge  # stops the parser; uvicorn answers through send_400_response

        def on_message_begin(self) -> None:
            self._message_header_bytes = 0
            super().on_message_begin()

        def on_body(self, body: bytes) -> None:
            """uvicorn's, with ``settings.body_high_water_bytes`` as the pause limit."""
            if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
                return
            self.cycle.body += body
            if len(self.cycle.body) > settings.body_high_water_bytes:
                self.flow.pause_reading()
            self.cycle.message_event.set()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

    GuardedHttpToolsProtocol = _GuardedHttpTools
except ImportError:  # httptools is not installed
    GuardedHttpToolsProtocol = None


def guarded_protocol() -> type[asyncio.Protocol]:
    """The protocol the gateway serves with: httptools' when it is installed (module doc), else h11's."""
    return GuardedHttpToolsProtocol or GuardedH11Protocol


def install(header_timeout_s: float, on_refusal: Callable[[str], None] | None = None) -> None:
    """Make uvicorn's ``http="auto"`` use ``guarded_protocol()`` in this process."""
    import uvicorn.config

    settings.header_timeout_s = header_timeout_s
    settings.on_refusal = on_refusal
    name = "GuardedH11Protocol" if GuardedHttpToolsProtocol is None else "_GuardedHttpTools"
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{name}"
