"""How the gateway guards its workers against slow or hostile clients, and which BentoML
layers it runs (settings ``HANSGATE_*``, read once per worker; one line per bad value).

===============================  ========  =====================================================
``HANSGATE_HEADER_TIMEOUT_S``    10        a request's headers must arrive within this (408)
``HANSGATE_BODY_TIMEOUT_S``      10        a body may take this long, plus its length at
``HANSGATE_BODY_MIN_RATE``       65536     this many bytes/s (408 ``slow_body``)
``HANSGATE_MAX_READERS``         1024      bodies a worker reads at once (429 beyond)
``HANSGATE_DECODE_THREADS``      2         threads decoding images and large bodies per worker
``HANSGATE_ACCESS_LOG``          0         BentoML's access log (one log line per request)
``HANSGATE_TRACING``             0         BentoML's OpenTelemetry spans for the gateway's routes
``HANSGATE_REUSE_BUFFERS``       1         body-sized buffers from the heap, kept for reuse
                                           (``service.allocator``; glibc)
===============================  ========  =====================================================

Why a body deadline and a concurrency limit of its own: BentoML's ``max_concurrency``
counts a request from its first byte, so 256 connections that trickle a body in took every
slot and all other clients got 429 until BentoML's 60 s timeout. The gateway instead reads
each body under a deadline and admits a request to the limited part (decoding, the model)
only once its body is complete; ``hansgate_rejected_requests_total`` counts each refusal.

Why BentoML's access log and tracing are off by default: the gateway exports its own
request counters and latency histograms, and per request a log line and an OpenTelemetry
span cost more than the rest of a single-row prediction (issue 13's profile). Either comes
back with its setting. BentoML's request metrics stay off (they label series with the raw
request path, so any client could add series).
"""

from __future__ import annotations

import os
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hansgate.errors import ConfigError

__all__ = ["ENV", "ServingOptions"]

ENV: dict[str, str] = {
    "HANSGATE_HEADER_TIMEOUT_S": "header_timeout_s",
    "HANSGATE_BODY_TIMEOUT_S": "body_timeout_s",
    "HANSGATE_BODY_MIN_RATE": "body_min_rate",
    "HANSGATE_MAX_READERS": "max_readers",
    "HANSGATE_DECODE_THREADS": "decode_threads",
    "HANSGATE_ACCESS_LOG": "access_log",
    "HANSGATE_TRACING": "tracing",
    "HANSGATE_REUSE_BUFFERS": "reuse_buffers",
}


class ServingOptions(BaseModel):
    """Per-worker guards (see the module doc). ``max_inflight`` (requests past their body, per
    worker) and ``request_timeout_s`` come from ``HANSGATE_MAX_CONCURRENCY`` / workers and
    ``HANSGATE_TIMEOUT_S``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    body_timeout_s: float = Field(10.0, gt=0, le=3600)
    body_min_rate: int = Field(65536, ge=1)
    max_readers: int = Field(1024, ge=1, le=1_000_000)
    decode_threads: int = Field(2, ge=1, le=64)
    access_log: bool = False
    tracing: bool = False
    reuse_buffers: bool = True
    max_inflight: int = Field(256, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)

    def body_deadline_s(self, length: int) -> float:
        """Seconds a body of ``length`` bytes may take to arrive."""
        return self.body_timeout_s + length / self.body_min_rate

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "ServingOptions":
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {f: environ[v] for v, f in ENV.items() if environ.get(v)}
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            var = next((v for v, f in ENV.items() if f == field), field)
            raise ConfigError(f"{var}: {first['msg']}") from None

