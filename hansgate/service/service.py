"""The BentoML 1.4 service: ``bentoml serve service.service:Gateway`` (``bentofile.yaml`` names it).

Each worker builds one ``service.gateway.Gateway`` from the environment (``service.config``)
when BentoML instantiates the service: the bundle is verified (hashes, schema version,
graph outputs) and a bad one stops the worker with a one-line ``BundleError``. ``/readyz``
answers 200 only once the onnxruntime session is loaded (``__is_ready__``). The routes
come from ``service.app``; BentoML's ``/metrics`` exports the ``hansgate_*`` metrics of all
workers through prometheus-client's multiprocess collector.
"""

from __future__ import annotations

import bentoml

from hansgate.service.app import create_app
from hansgate.service.config import GatewayConfig, ServiceOptions
from hansgate.service.gateway import Gateway as _GatewayState

__all__ = ["Gateway"]

_OPTIONS = ServiceOptions.from_env()
_state: dict[str, _GatewayState] = {}

app = create_app(lambda: _state.get("gateway"))


@bentoml.service(name="hansgate", workers=_OPTIONS.workers,
                 traffic={"timeout": _OPTIONS.timeout_s, "max_concurrency": _OPTIONS.max_concurrency})
@bentoml.asgi_app(app, path="/")
class Gateway:
    """hansgate gateway: serves one bundle with onnxruntime and monitors it into Prometheus."""

    def __init__(self) -> None:
        self.gateway = _GatewayState(GatewayConfig.from_env(), workers=_OPTIONS.workers)
        _state["gateway"] = self.gateway

    def __is_ready__(self) -> bool:
        return self.gateway.ready

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.gateway.close()
