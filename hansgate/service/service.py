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
* ``traffic.timeout`` / ``max_concurrency``: not given to BentoML. Its concurrency limit counts
  requests from their first byte (slow bodies filled it) and its timeout spawns a task and a
  timer per request; the gateway bounds bodies, in-flight requests and run time itself.
* uvicorn's HTTP protocol gets a header deadline (``service.protocol``).
"""

from __future__ import annotations

import math

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
        from hansgate.service import multiproc, protocol

        try:
            cfg = GatewayConfig.from_env()
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


def _install_protocol() -> None:
    """The header deadline, installed when a worker imports this module (before uvicorn starts)."""
    from hansgate.service import protocol

    protocol.install(_SERVING.header_timeout_s)


_install_protocol()
