"""The gateway's configuration, read from the environment in this one place.

Every setting is an environment variable ``HANSGATE_*`` (see ``ENV``); ``GatewayConfig.from_env``
reads them once per worker and validates them with pydantic, so a bad value stops the
worker with one line naming the variable. Tests build ``GatewayConfig`` directly.

Receipt key: every worker and replica that may receive feedback for a prediction must share
the HMAC key. Set ``HANSGATE_RECEIPT_KEY`` (e.g. from a Kubernetes Secret) in production;
without it the workers of one machine share a random key kept in ``<state dir>/receipt.key``
(created once, mode 0600), which does not reach other replicas.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hansgate.errors import ConfigError

__all__ = ["ENV", "GatewayConfig", "ServiceOptions", "load_receipt_key"]

#: environment variable -> GatewayConfig field
ENV: dict[str, str] = {
    "HANSGATE_BUNDLE": "bundle",
    "HANSGATE_PROVIDER": "provider",
    "HANSGATE_ORT_THREADS": "ort_threads",
    "HANSGATE_MAX_BATCH": "max_batch",
    "HANSGATE_MAX_BODY_BYTES": "max_body_bytes",
    "HANSGATE_MICROBATCH_ROWS": "microbatch_rows",
    "HANSGATE_MICROBATCH_WAIT_MS": "microbatch_wait_ms",
    "HANSGATE_MONITORING": "monitoring",
    "HANSGATE_STATE_DIR": "state_dir",
    "HANSGATE_RECEIPT_KEY": "receipt_key",
    "HANSGATE_RECEIPT_TTL_S": "receipt_ttl_s",
    "HANSGATE_STORE_SIZE": "store_size",
    "HANSGATE_RECALL_MARGIN": "recall_margin",
    "HANSGATE_TCAV_MARGIN": "tcav_margin",
    "HANSGATE_MIN_SAMPLES": "min_samples",
    "HANSGATE_PRESENCE_SURGE_FACTOR": "presence_surge_factor",
}


class GatewayConfig(BaseModel):
    """Settings of one gateway worker (units in the names; defaults in the fields).

    ``provider``: ``auto`` (CUDA when usable, else CPU), ``cuda`` (refuse to start without it)
    or ``cpu``. ``max_batch``: rows one request may carry. ``microbatch_rows`` /
    ``microbatch_wait_ms``: adaptive batching across concurrent requests of a worker (a batch
    runs when it has this many rows or its first request waited this long). ``monitoring``:
    concept heads and metrics on (off only for the overhead benchmark).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: Path
    provider: Literal["auto", "cuda", "cpu"] = "auto"
    ort_threads: int = Field(0, ge=0, le=256, description="intra-op threads; 0 = cores / workers")
    max_batch: int = Field(256, ge=1, le=65536)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    microbatch_rows: int = Field(256, ge=1, le=65536)
    microbatch_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    monitoring: bool = True
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".hansgate" / "state")
    receipt_key: str | None = Field(None, min_length=16, repr=False)
    receipt_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    store_size: int = Field(100_000, ge=1)
    recall_margin: float = Field(0.1, ge=0.0, le=1.0)
    tcav_margin: float = Field(0.15, ge=0.0, le=1.0)
    min_samples: int = Field(30, ge=1)
    presence_surge_factor: float = Field(2.0, gt=1.0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "GatewayConfig":
        """Read ``HANSGATE_*`` variables (``HANSGATE_BUNDLE`` is required)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {field: environ[var] for var, field in ENV.items() if environ.get(var)}
        values.update(overrides)
        if "bundle" not in values:
            raise ConfigError("HANSGATE_BUNDLE is not set: point it at a bundle directory")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            var = next((v for v, f in ENV.items() if f == field), field)
            raise ConfigError(f"{var}: {first['msg']}") from exc

    def threads(self, workers: int, cores: int | None = None) -> int:
        """Intra-op threads for one worker: the setting, or the cores shared out among workers."""
        if self.ort_threads:
            return self.ort_threads
        cores = cores or os.cpu_count() or 1
        return max(1, cores // max(1, workers))


class ServiceOptions(BaseModel):
    """BentoML service settings, fixed when the service class is defined (``HANSGATE_WORKERS``,
    ``HANSGATE_TIMEOUT_S``, ``HANSGATE_MAX_CONCURRENCY``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(1, ge=1, le=64)
    timeout_s: int = Field(60, ge=1)
    max_concurrency: int = Field(256, ge=1)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceOptions":
        environ = os.environ if environ is None else environ
        names = {"HANSGATE_WORKERS": "workers", "HANSGATE_TIMEOUT_S": "timeout_s",
                 "HANSGATE_MAX_CONCURRENCY": "max_concurrency"}
        values = {f: environ[v] for v, f in names.items() if environ.get(v)}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            var = next(v for v, f in names.items() if f == first["loc"][0])
            raise ConfigError(f"{var}: {first['msg']}") from exc


def load_receipt_key(cfg: GatewayConfig) -> bytes:
    """The HMAC key: ``HANSGATE_RECEIPT_KEY``, else the machine-local key file (created once)."""
    if cfg.receipt_key:
        return cfg.receipt_key.encode()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.state_dir / "receipt.key"
    try:
        # O_EXCL: of several workers starting together exactly one creates the key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    for _ in range(100):  # another worker may be between create and write
        key = path.read_text().strip()
        if len(key) == 64:
            return key.encode()
        import time

        time.sleep(0.01)
    raise ConfigError(f"receipt key file {path} is malformed; delete it or set HANSGATE_RECEIPT_KEY")
