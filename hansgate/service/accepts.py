"""How the workers of one gateway share new connections (BentoML gives them one listening socket).

asyncio accepts every pending connection each time the listening socket is readable, so a client
that opens 8 keep-alive connections together often had all 8 land on the worker that woke first,
while the other idled for the whole run (half the machine unused). ``spread_accepts`` changes two
things in each worker's asyncio loop, before uvicorn starts:

* **one accept per wake-up** (``per_wake``): the next pending connection goes to whichever worker
  wakes next;
* **pacing**: after an accept, a worker that holds ``k`` open connections stops watching the socket
  for ``min(max_pause_s, k * pause_per_connection_s)``. One accept per wake-up alone still let all
  8 connections land on one worker in about a third of the benchmark's runs: the other worker's
  event loop, woken on a busy core, did not run before the first had taken them one by one. A
  worker that holds more connections now leaves the queue to the others for longer. A worker
  that holds none never pauses, and a connection waits at most ``max_pause_s`` more to be accepted.

``held`` is the number of open connections of this process; the gateway's HTTP protocol
(``service.protocol``) reports each one's start and end through ``connection_opened`` and
``connection_closed``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["spread_accepts", "connection_opened", "connection_closed", "held", "pause_s"]

_held = 0


def connection_opened() -> None:
    global _held
    _held += 1


def connection_closed() -> None:
    global _held
    _held = max(0, _held - 1)


def held() -> int:
    """Open connections of this process (all its protocols share the one event loop)."""
    return _held


def pause_s(connections: int, pause_per_connection_s: float, max_pause_s: float) -> float:
    """How long a worker holding ``connections`` leaves the listening socket to the others after an accept."""
    return min(max_pause_s, connections * pause_per_connection_s)


def spread_accepts(per_wake: int = 1, pause_per_connection_s: float = 0.0, max_pause_s: float = 0.002) -> None:
    """Accept at most ``per_wake`` connections per wake-up of this process's asyncio loops, then pause
    (``pause_s``; 0 with one worker, where there is nobody to leave connections to). Idempotent:
    a second call replaces the first's settings."""
    from asyncio import selector_events

    cls: Any = selector_events.BaseSelectorEventLoop
    original = getattr(cls, "_hansgate_accept", None) or cls._accept_connection
    cls._hansgate_accept = original

    def _accept_connection(self: Any, protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None,
                           backlog: int = 100, *args: Any) -> None:
        original(self, protocol_factory, sock, sslcontext, server, min(backlog, per_wake), *args)
        pause = pause_s(_held, pause_per_connection_s, max_pause_s)
        if pause <= 0 or sock.fileno() == -1:
            return
        # asyncio's own pattern when accept runs out of file descriptors: stop watching, serve again later
        self._remove_reader(sock.fileno())
        self.call_later(pause, _resume, self, protocol_factory, sock, sslcontext, server, backlog, *args)

    cls._accept_connection = _accept_connection


def _resume(loop: Any, protocol_factory: Any, sock: Any, sslcontext: Any, server: Any, backlog: int,
            *args: Any) -> None:
    """Watch the listening socket again, unless the server closed it meanwhile."""
    if sock.fileno() == -1 or (server is not None and not server.is_serving()):
        return
    loop._start_serving(protocol_factory, sock, sslcontext, server, backlog, *args)
