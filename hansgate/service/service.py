"""The BentoML 1.4 service: ``bentoml serve hansgate.service.service:Gateway`` (``bentofile.yaml`` names it).

Each worker builds one ``service.gateway.Gateway`` from the environment (``service.config``)
when BentoML instantiates the service: the bundle is verified (hashes, schema version,
graph outputs) and a bad one stops the worker with a one-line ``BundleError``. ``/readyz``
answers 200 only once the onnxruntime session is loaded (``__is_ready__``). The routes
come from ``service.app``; ``/metrics`` there exports the ``hansgate_*`` metrics of all
workers from this gateway's own multiprocess directory (``service.multiproc``).

What of BentoML runs, and why (``service.limits`` has the settings):

* request metrics: off. They label series with the raw request path (any client could add
  series) and duplicate ``hansgate_request_seconds``.
* access log and OpenTelemetry spans: off by default (``HANSGATE_ACCESS_LOG=1``,
  ``HANSGATE_TRACING=1``); per request they cost more than the rest of a single-row prediction.
* ``max_concurrency``: not given to BentoML. Its concurrency limit counts requests from their
  first byte (slow bodies filled it); the gateway bounds bodies and in-flight requests itself.
* ``traffic.timeout``: BentoML always installs its ``TimeoutMiddleware`` (the setting must be
  positive), which spawns a task and a timer per request. ``POST /predict`` and ``/feedback``
  pass straight through it (``_own_deadlines``): the gateway bounds their body reads and run
  time itself; every other route keeps BentoML's timeout. Past it they skip BentoML's request
  context and Starlette's routing (the gateway uses neither) when nothing else is configured there.
* new connections are spread over the workers (``service.accepts``).
* uvicorn's HTTP protocol gets a header deadline (``service.protocol``).
* body-sized buffers come from the heap and are reused (``service.allocator``,
  ``HANSGATE_REUSE_BUFFERS``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import bentoml

from hansgate.service.app import create_app
from hansgate.service.config import (
    GatewayConfig,
    refuse_start,
    service_options,
    serving_options,
)
from hansgate.service.gateway import Gateway as _GatewayState

__all__ = ["Gateway"]

_OPTIONS = service_options()
_SERVING = serving_options(max_inflight=math.ceil(_OPTIONS.max_concurrency / _OPTIONS.workers),
                           request_timeout_s=float(_OPTIONS.timeout_s))
_state: dict[str, _GatewayState] = {}
log = logging.getLogger("hansgate.service")

app = create_app(lambda: _state.get("gateway"), _SERVING)

_EXCLUDE_ALL = "" if _SERVING.tracing else ".*"


@bentoml.service(name="hansgate", workers=_OPTIONS.workers,
                 traffic={"timeout": float(_OPTIONS.timeout_s)},
                 metrics={"enabled": False},
                 logging={"access": {"enabled": _SERVING.access_log}},
                 **({} if _SERVING.tracing else {"tracing": {"excluded_urls": [_EXCLUDE_ALL]}}))
@bentoml.asgi_app(app, path="/")
class Gateway:
    """hansgate gateway: serves one bundle with onnxruntime and monitors it into Prometheus."""

    def __init__(self) -> None:
        from hansgate.service import allocator, multiproc, protocol

        try:
            cfg = GatewayConfig.from_env()
            if _SERVING.reuse_buffers:  # the largest body, plus its .npy or JSON framing
                allocator.reuse_large_buffers(cfg.max_body_bytes + 2**20)
            # before the first metric value exists: this gateway's own multiprocess directory
            _, started = multiproc.use_own_directory(cfg.state_dir)
            self.gateway = _GatewayState(cfg, workers=_OPTIONS.workers, started_at=started)
        except Exception as exc:  # one line and the whole server stops, instead of a restart every 10 s
            refuse_start(exc)
        _state["gateway"] = self.gateway
        app.state.bind_schemas(self.gateway.manifest, cfg.max_batch)
        protocol.settings.on_refusal = lambda reason: self.gateway.metrics.reject("connection", reason)

    def __is_ready__(self) -> bool:
        return self.gateway.ready

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.gateway.close()


#: routes whose body read and run time the gateway bounds itself (``service.app``)
_OWN_DEADLINES = frozenset({("POST", "/predict"), ("POST", "/feedback")})


def _own_deadlines() -> None:
    """Let ``_OWN_DEADLINES`` bypass BentoML's ``TimeoutMiddleware`` in this process (module doc).

    Past it, BentoML 1.4 has only its ``ContextMiddleware`` (a request object and context
    variables for BentoML's own APIs, which the gateway does not use), then Starlette's routing
    down to the mounted app. When that is all there is (no CORS or user middleware configured),
    those routes go straight to the gateway's handler (``GatewayAPI.fast_routes``), which is
    where that routing ends anyway; otherwise they take the full path. Leaves BentoML untouched
    (with a log line) when its middleware is not where BentoML 1.4 has it.
    """
    try:
        from bentoml._internal.server.http import traffic

        cls: Any = traffic.TimeoutMiddleware
    except (ImportError, AttributeError):
        log.warning("BentoML's TimeoutMiddleware not found; it stays on every route")
        return
    try:
        from _bentoml_impl.server.app import ContextMiddleware

        context_cls: type | None = ContextMiddleware
    except (ImportError, AttributeError):
        context_cls = None
    original = getattr(cls, "_hansgate_original", None) or cls.__call__
    cls._hansgate_original = original

    async def __call__(self: Any, scope: dict, receive: Any, send: Any) -> None:
        key = (scope.get("method"), scope.get("path"))
        if scope["type"] == "http" and key in _OWN_DEADLINES:
            handler = app.fast_routes.get(key) if context_cls is not None and type(self.app) is context_cls \
                else None
            await (handler or self.app)(scope, receive, send)
            return
        await original(self, scope, receive, send)

    cls.__call__ = __call__


#: after an accept, a worker pauses this long per connection it holds, at most ``_ACCEPT_MAX_PAUSE_S``
#: (``service.accepts``): long enough for a late-woken worker to take its share of a burst of new
#: connections, short enough that a connection storm is still accepted at hundreds per second per worker
_ACCEPT_PAUSE_PER_CONNECTION_S = 0.00025
_ACCEPT_MAX_PAUSE_S = 0.002


def _install_protocol() -> None:
    """The header deadline and the spread of connections over workers, installed when a worker
    imports this module (before uvicorn starts); BentoML's timeout off the gateway's own routes."""
    from hansgate.service import accepts, protocol

    protocol.install(_SERVING.header_timeout_s)
    accepts.spread_accepts(pause_per_connection_s=_ACCEPT_PAUSE_PER_CONNECTION_S if _OPTIONS.workers > 1 else 0.0,
                           max_pause_s=_ACCEPT_MAX_PAUSE_S)
    _own_deadlines()


_install_protocol()
