"""The gateway's HTTP routes (FastAPI, mounted into the BentoML service by ``service.service``).

``POST /predict``   JSON (``PredictJSON``), a raw PNG/JPEG body, or a raw float32 ``.npy`` body
``POST /feedback``  ``FeedbackRequest`` -> counts tp/fn/fp/tn per class and subgroup
``GET  /compliance`` the subgroup/TCAV snapshot as JSON, or HTML (``Accept: text/html`` or
                    ``/compliance.html``)

BentoML adds ``/metrics``, ``/livez``, ``/readyz`` and ``/docs.json`` (which merges this
app's OpenAPI document). Bodies are read with a hard size limit before parsing; every
refusal is one ``{"error": reason, "detail": one line}`` body with the status from
``service.errors`` and is counted in ``hansgate_rejected_requests_total``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError

from hansgate.errors import HansgateError, RequestError
from hansgate.service.errors import Rejection, rejection
from hansgate.service.gateway import Gateway
from hansgate.service.inputs import IMAGE_TYPES, NPY_TYPES
from hansgate.service.schemas import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    PredictJSON,
    PredictResponse,
)

__all__ = ["create_app"]

log = logging.getLogger("hansgate.service")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in [
        (400, "malformed body"), (413, "body or batch too large"), (415, "unsupported content type"),
        (422, "invalid input (shape, dtype, NaN/inf, empty batch, unknown label/attribute)"),
        (503, "model not loaded yet")]}
_FEEDBACK_ERRORS = _ERRORS | {code: {"model": ErrorResponse, "description": text} for code, text in [
    (403, "receipt does not verify"), (404, "unknown request id (not in this replica's store)"),
    (409, "duplicate feedback, or a receipt for another model"), (410, "receipt expired")]}


def _json_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictJSON.model_json_schema()},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "application/x-npy": {"schema": {"type": "string", "format": "binary"}}}}}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError("Content-Length is not a number", "bad_request") from None
        if size > limit:
            raise RequestError(f"body of {size} bytes is over the limit of {limit}", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body is over the limit of {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(f"body is not valid JSON: {first['msg']}", "bad_json") from None
        where = ".".join(map(str, first["loc"])) or "body"
        raise RequestError(f"{where}: {first['msg']}", "invalid") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def create_app(get_gateway: Callable[[], Gateway | None]) -> FastAPI:
    """The routes over the gateway ``get_gateway()`` returns (``None`` while it loads)."""
    app = FastAPI(title="hansgate gateway", version="1.0",
                  description="Predictions with concept monitoring, delayed-feedback subgroup recall and a "
                              "compliance snapshot for a hansgate bundle.")
    template = None

    def _gateway() -> Gateway:
        gw = get_gateway()
        if gw is None:
            raise RequestError("the model is not loaded yet", "not_ready")
        return gw

    def _refuse(route: str, exc: HansgateError) -> JSONResponse:
        r: Rejection = rejection(exc)
        gw = get_gateway()
        if gw is not None:
            gw.metrics.reject(route, r.reason)
        return JSONResponse(r.body(), status_code=r.status)

    @app.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY,
              summary="Predict classes, probabilities and concept scores for one sample or a batch")
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            gw = _gateway()
            body = await _read_body(request, gw.cfg.max_body_bytes)
            kind = _media_type(request)
            pre = gw.preprocessor
            if kind in IMAGE_TYPES:
                x = pre.from_images([body])
            elif kind in NPY_TYPES:
                x = pre.from_npy(body)
            elif kind == "application/json":
                req = _parse(PredictJSON, body)
                x = pre.from_nested(req.tensor) if req.tensor is not None else pre.from_base64(req.images or [])
            else:
                raise RequestError(f"content type {kind[:64]!r} is not JSON, PNG, JPEG or .npy",
                                   "unsupported_media_type")
            result = await gw.predict(x)
        except HansgateError as exc:
            return _refuse("predict", exc)
        gw.metrics.request_seconds.labels("predict").observe(time.perf_counter() - t0)
        return Response(json.dumps(result, separators=(",", ":")), media_type="application/json")

    @app.post("/feedback", response_model=FeedbackResponse, responses=_FEEDBACK_ERRORS,
              openapi_extra=_json_body(FeedbackRequest),
              summary="Report the true label (and subgroup attributes) of an earlier prediction")
    async def feedback(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            gw = _gateway()
            if _media_type(request) != "application/json":
                raise RequestError("feedback must be JSON", "unsupported_media_type")
            req = _parse(FeedbackRequest, await _read_body(request, min(gw.cfg.max_body_bytes, 64 * 1024)))
            out = await asyncio.get_running_loop().run_in_executor(gw.io_executor, gw.feedback, req)
        except HansgateError as exc:
            return _refuse("feedback", exc)
        gw.metrics.request_seconds.labels("feedback").observe(time.perf_counter() - t0)
        return JSONResponse(out)

    async def _snapshot() -> dict:
        gw = _gateway()
        return await asyncio.get_running_loop().run_in_executor(gw.io_executor, gw.compliance)

    @app.get("/compliance", responses={200: {"content": {"text/html": {}}}, 503: _ERRORS[503]},
             summary="Subgroup recall/precision with intervals, TCAV vs baseline, flags (JSON or HTML)")
    async def compliance(request: Request) -> Response:
        try:
            snap = await _snapshot()
        except HansgateError as exc:
            return _refuse("compliance", exc)
        accept = request.headers.get("accept", "")
        if "text/html" in accept and "application/json" not in accept.split(",")[0]:
            return HTMLResponse(_render(snap))
        return JSONResponse(snap)

    @app.get("/compliance.html", response_class=HTMLResponse, summary="The compliance snapshot as HTML")
    async def compliance_html() -> Response:
        try:
            snap = await _snapshot()
        except HansgateError as exc:
            return _refuse("compliance", exc)
        return HTMLResponse(_render(snap))

    def _render(snap: dict) -> str:
        nonlocal template
        if template is None:
            import jinja2

            env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                     autoescape=True)
            template = env.get_template("compliance.html")
        return template.render(s=snap)

    return app
