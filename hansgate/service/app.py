"""The gateway's HTTP routes (FastAPI, mounted into the BentoML service by ``service.service``).

``POST /predict``   JSON (schema from the manifest), a raw PNG/JPEG body, or a raw float32 ``.npy``
``POST /feedback``  JSON (schema from the manifest) -> counts tp/fn/fp/tn per class and subgroup
``GET  /compliance`` the subgroup/TCAV snapshot as JSON, or HTML (``Accept: text/html`` or
                    ``/compliance.html``)
``GET  /metrics``    every worker's ``hansgate_*`` metrics (this gateway's own multiprocess directory)

BentoML adds ``/livez``, ``/readyz`` and ``/docs.json`` (which merges this app's OpenAPI
document). The request schemas are generated from the manifest (``schemas``) once the
gateway is loaded, so the document promises exactly what the server enforces.

The two hot routes and ``/metrics`` are served by ``GatewayAPI.__call__`` straight from the
ASGI scope (no FastAPI request object, dependency solving or response class per request);
the FastAPI routes of the same paths call the same functions and carry the documentation.
Per request: the body is read under a deadline (``limits.ServingOptions``: slow clients get
408 and free their place), then admitted to at most ``max_inflight`` requests being decoded
or run (429 beyond); images and large JSON bodies are decoded on a small thread pool, never
on the event loop. Every refusal is one ``{"error": reason, "detail": one line}`` body with the
status from ``service.errors``, counted in ``hansgate_rejected_requests_total``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError

from hansgate.errors import HansgateError, RequestError
from hansgate.manifest import Manifest
from hansgate.service.errors import Rejection, rejection
from hansgate.service.fairness import ATTRIBUTE_HEADER, parse_attribute_header
from hansgate.service.gateway import Gateway
from hansgate.service.inputs import IMAGE_TYPES, NPY_TYPES, check_json, json_limits
from hansgate.service.limits import ServingOptions
from hansgate.service.metrics import exposition
from hansgate.service.schemas import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    PredictJSON,
    PredictResponse,
    feedback_json_schema,
    predict_json_schema,
)
from hansgate.service.threads import name_os_thread

__all__ = ["create_app", "GatewayAPI"]

log = logging.getLogger("hansgate.service")

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[dict], Awaitable[None]]
Reply = tuple[int, bytes, list[tuple[bytes, bytes]]]

_STATUS_TEXT = [(400, "malformed body"), (408, "headers or body too slow"), (413, "body or batch too large"),
                (415, "unsupported content type"),
                (422, "invalid input (shape, dtype, NaN/inf, out of range, empty batch, unknown label/attribute)"),
                (429, "too many requests in progress"), (503, "model not loaded yet"), (504, "timed out")]
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": text}
                                            for code, text in _STATUS_TEXT}
_FEEDBACK_ERRORS = _ERRORS | {code: {"model": ErrorResponse, "description": text} for code, text in [
    (403, "receipt does not verify"), (404, "unknown request id (not in this replica's store)"),
    (409, "duplicate feedback, or a receipt for another model"), (410, "receipt expired")]}
_JSON = [(b"content-type", b"application/json")]
_CLOSE = [(b"connection", b"close")]
# JSON bodies up to this size are parsed on the event loop (a thread hop costs more); a .npy body is
# a zero-copy view plus one min/max pass at any size, so it never leaves the loop
_INLINE_BYTES = 32 * 1024
#: a JSON boolean as an array item; attribute names and values (a safe alphabet without , [ ]) cannot match
_ARRAY_BOOLEAN = re.compile(rb"[\[,]\s*(?:true|false)\s*[,\]]")
ATTRIBUTE_HEADER_BYTES = ATTRIBUTE_HEADER.lower().encode()


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(f"body is not valid JSON: {first['msg']}", "bad_json") from None
        where = ".".join(map(str, first["loc"])) or "body"
        raise RequestError(f"{where}: {first['msg']}"[:300], "invalid") from None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _media_type(headers: list[tuple[bytes, bytes]]) -> str:
    raw = _header(headers, b"content-type")
    return "application/json" if raw is None else raw.decode("latin-1").split(";")[0].strip().lower()


class _Guard:
    """Body deadlines, the reader and in-flight limits, and the decode pool of one worker."""

    def __init__(self, options: ServingOptions) -> None:
        self.options = options
        self.readers = 0
        self.inflight = 0
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            options.decode_threads, thread_name_prefix="hansgate-decode", initializer=name_os_thread,
            initargs=("hansgate-decode",))

    async def read_body(self, headers: list[tuple[bytes, bytes]], receive: Receive, limit: int) -> bytes:
        declared = _header(headers, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError("Content-Length is not a number", "bad_request") from None
            if size > limit:
                raise RequestError(f"body of {size} bytes is over the limit of {limit}", "body_too_large")
        else:
            size = limit
        if self.readers >= self.options.max_readers:
            raise RequestError("too many bodies being read; retry", "overloaded")
        self.readers += 1
        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(self.options.body_deadline_s(size)):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        raise RequestError("client disconnected", "bad_request")
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > limit:
                        raise RequestError(f"body is over the limit of {limit} bytes", "body_too_large")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise RequestError(f"body did not arrive within {self.options.body_deadline_s(size):.0f} s "
                               f"({total} of {size} bytes)", "slow_body") from None
        finally:
            self.readers -= 1
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)


class GatewayAPI(FastAPI):
    """FastAPI with the hot routes served straight from the ASGI scope (see the module doc)."""

    fast_routes: dict[tuple[str, str], Callable[[dict, Receive, Send], Awaitable[None]]] = {}

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http":
            handler = self.fast_routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)  # type: ignore[arg-type]


async def _reply(send: Send, reply: Reply) -> None:
    status, body, headers = reply
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(get_gateway: Callable[[], Gateway | None], options: ServingOptions | None = None) -> GatewayAPI:
    """The routes over the gateway ``get_gateway()`` returns (``None`` while it loads)."""
    opts = options or ServingOptions()
    guard = _Guard(opts)
    app = GatewayAPI(title="hansgate gateway", version="1.0",
                     description="Predictions with concept monitoring, delayed-feedback subgroup recall and a "
                                 "compliance snapshot for a hansgate bundle.")
    app.fast_routes = {}
    template = None
    # request schemas: generic until a gateway is bound, then generated from its manifest (bind_schemas)
    predict_body: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictJSON.model_json_schema()},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}}}}}
    feedback_body: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": FeedbackRequest.model_json_schema()}}}}
    limits_cache: dict[int, Any] = {}

    def bind_schemas(manifest: Manifest, max_batch: int) -> None:
        predict_body["requestBody"]["content"]["application/json"]["schema"] = predict_json_schema(manifest,
                                                                                                   max_batch)
        feedback_body["requestBody"]["content"]["application/json"]["schema"] = feedback_json_schema(manifest)
        app.openapi_schema = None

    app.state.bind_schemas = bind_schemas

    def _gateway() -> Gateway:
        gw = get_gateway()
        if gw is None:
            raise RequestError("the model is not loaded yet", "not_ready")
        if id(gw) not in limits_cache:
            limits_cache.clear()
            limits_cache[id(gw)] = json_limits(gw.manifest.input, gw.cfg.max_batch, gw.cfg.max_body_bytes)
            bind_schemas(gw.manifest, gw.cfg.max_batch)
        return gw

    def _refusal(route: str, exc: HansgateError) -> Reply:
        r: Rejection = rejection(exc)
        gw = get_gateway()
        if gw is not None:
            gw.metrics.reject(route, r.reason)
        extra = _CLOSE if r.reason in ("slow_body", "body_too_large") else []  # the rest of the body is not read
        return r.status, json.dumps(r.body()).encode(), _JSON + extra

    def _decode(gw: Gateway, kind: str, body: bytes) -> tuple[Any, Any]:
        """``(x, attributes)``: the preprocessed batch, and the JSON body's ``attributes`` (``None`` for raw bodies)."""
        pre = gw.preprocessor
        if kind in IMAGE_TYPES:
            return pre.from_images([body]), None
        if kind in NPY_TYPES:
            return pre.from_npy(body), None
        req = _parse(PredictJSON, body)
        if req.tensor is not None:
            if (b"true" in body or b"false" in body) and _ARRAY_BOOLEAN.search(body):
                raise RequestError("tensor must hold numbers only, got booleans", "dtype")
            return pre.from_nested(req.tensor), req.attributes
        return pre.from_base64(req.images or []), req.attributes

    async def predict_core(headers: list[tuple[bytes, bytes]], receive: Receive) -> Reply:
        t0 = time.perf_counter()
        try:
            gw = _gateway()
            kind = _media_type(headers)
            if kind == "application/json":
                limit = limits_cache[id(gw)]["predict"].max_bytes
            elif kind in IMAGE_TYPES or kind in NPY_TYPES:
                limit = gw.cfg.max_body_bytes
            else:
                raise RequestError(f"content type {kind[:64]!r} is not JSON, PNG, JPEG or .npy",
                                   "unsupported_media_type")
            body = await guard.read_body(headers, receive, limit)
            if guard.inflight >= opts.max_inflight:
                raise RequestError(f"{guard.inflight} requests in progress on this worker; retry", "overloaded")
            guard.inflight += 1
            try:
                if kind == "application/json":
                    check_json(body, limits_cache[id(gw)]["predict"])
                if kind in IMAGE_TYPES or (kind == "application/json" and len(body) > _INLINE_BYTES):
                    x, attributes = await guard.offload(_decode, gw, kind, body)
                else:
                    x, attributes = _decode(gw, kind, body)
                if attributes is None and (header := _header(headers, ATTRIBUTE_HEADER_BYTES)) is not None:
                    attributes = parse_attribute_header(header.decode("latin-1"), gw.declared)
                try:
                    async with asyncio.timeout(opts.request_timeout_s):
                        out = await gw.predict(x, attributes)
                except TimeoutError:
                    raise RequestError(f"no answer within {opts.request_timeout_s:g} s", "timeout") from None
            finally:
                guard.inflight -= 1
        except HansgateError as exc:
            return _refusal("predict", exc)
        gw.metrics.predict_seconds.observe(time.perf_counter() - t0)
        return 200, out, _JSON

    async def feedback_core(headers: list[tuple[bytes, bytes]], receive: Receive) -> Reply:
        t0 = time.perf_counter()
        try:
            gw = _gateway()
            if _media_type(headers) != "application/json":
                raise RequestError("feedback must be JSON", "unsupported_media_type")
            lim = limits_cache[id(gw)]["feedback"]
            body = await guard.read_body(headers, receive, lim.max_bytes)
            check_json(body, lim)
            req = _parse(FeedbackRequest, body)
            out = await asyncio.get_running_loop().run_in_executor(gw.io_executor, gw.feedback, req)
        except HansgateError as exc:
            return _refusal("feedback", exc)
        gw.metrics.request_seconds.labels("feedback").observe(time.perf_counter() - t0)
        return 200, json.dumps(out).encode(), _JSON

    async def metrics_core() -> Reply:
        gw = get_gateway()
        registry = gw.metrics.registry if gw is not None else None
        loop = asyncio.get_running_loop()
        body, ctype = await loop.run_in_executor(guard.decode_pool, exposition, registry)
        return 200, body, [(b"content-type", ctype.encode())]

    async def fast_predict(scope: dict, receive: Receive, send: Send) -> None:
        await _reply(send, await predict_core(scope["headers"], receive))

    async def fast_feedback(scope: dict, receive: Receive, send: Send) -> None:
        await _reply(send, await feedback_core(scope["headers"], receive))

    async def fast_metrics(scope: dict, receive: Receive, send: Send) -> None:
        await _reply(send, await metrics_core())

    app.fast_routes.update({("POST", "/predict"): fast_predict, ("POST", "/feedback"): fast_feedback,
                            ("GET", "/metrics"): fast_metrics})

    def _response(reply: Reply) -> Response:
        status, body, headers = reply
        return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})

    @app.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=predict_body,
              summary="Predict classes, probabilities and concept scores for one sample or a batch")
    async def predict(request: Request) -> Response:
        return _response(await predict_core(request.scope["headers"], request.receive))

    @app.post("/feedback", response_model=FeedbackResponse, responses=_FEEDBACK_ERRORS, openapi_extra=feedback_body,
              summary="Report the true label (and subgroup attributes) of an earlier prediction")
    async def feedback(request: Request) -> Response:
        return _response(await feedback_core(request.scope["headers"], request.receive))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return _response(await metrics_core())

    async def _snapshot() -> dict:
        gw = _gateway()
        return await asyncio.get_running_loop().run_in_executor(gw.io_executor, gw.compliance)

    @app.get("/compliance", responses={200: {"content": {"application/json": {"schema": {"type": "object"}},
                                                         "text/html": {"schema": {"type": "string"}}}},
                                       503: _ERRORS[503]},
             summary="Subgroup recall/precision with intervals, TCAV vs baseline, flags (JSON or HTML)")
    async def compliance(request: Request) -> Response:
        try:
            snap = await _snapshot()
        except HansgateError as exc:
            return _response(_refusal("compliance", exc))
        accept = request.headers.get("accept", "")
        if "text/html" in accept and "application/json" not in accept.split(",")[0]:
            return HTMLResponse(_render(snap))
        return JSONResponse(snap)

    @app.get("/compliance.html", response_class=HTMLResponse, responses={503: _ERRORS[503]},
             summary="The compliance snapshot as HTML")
    async def compliance_html() -> Response:
        try:
            snap = await _snapshot()
        except HansgateError as exc:
            return _response(_refusal("compliance", exc))
        return HTMLResponse(_render(snap))

    def _render(snap: dict) -> str:
        nonlocal template
        if template is None:
            import jinja2

            env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                     autoescape=True)
            template = env.get_template("compliance.html")
        return template.render(s=snap)

    if get_gateway() is not None:
        _gateway()  # bind the manifest's schemas now
    return app
