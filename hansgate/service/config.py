"""The gateway's configuration, read from the environment in this one place.

Every setting is an environment variable ``HANSGATE_*`` (see ``ENV``); ``GatewayConfig.from_env``
reads them once per worker and validates them with pydantic, so a bad value stops the
worker with one line naming the variable. Tests build ``GatewayConfig`` directly.

``hansgate serve`` calls ``check_environment`` before BentoML starts, so a bad or unknown
``HANSGATE_*`` variable ends the command with one line and exit code 2; a worker that still
cannot start (``bentoml serve`` run directly, as in the container) calls ``refuse_start``,
which stops the whole server with one line instead of letting BentoML restart it forever.

Bundle signatures: ``HANSGATE_PUBLIC_KEY`` names an Ed25519 public key file; with it, every
worker refuses a bundle without a valid signature from that key (``hansgate.signing``).

Receipt key: every worker and replica that may receive feedback for a prediction must share
the HMAC key. Set ``HANSGATE_RECEIPT_KEY`` (e.g. from a Kubernetes Secret) in production;
without it the workers of one machine share a random key kept in ``<state dir>/receipt.key``
(created once, mode 0600), which does not reach other replicas.
"""

from __future__ import annotations

import difflib
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Literal, Mapping, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hansgate.errors import ConfigError, HansgateError
from hansgate.service import limits

__all__ = ["ENV", "SERVICE_ENV", "GatewayConfig", "ServiceOptions", "load_receipt_key", "check_environment",
           "service_options", "serving_options", "refuse_start", "EXIT_CONFIG"]

#: exit status of a process that refuses to start over a setting or a bundle (the CLI's error code)
EXIT_CONFIG = 2

#: environment variable -> GatewayConfig field
ENV: dict[str, str] = {
    "HANSGATE_BUNDLE": "bundle",
    "HANSGATE_PROVIDER": "provider",
    "HANSGATE_ORT_THREADS": "ort_threads",
    "HANSGATE_ORT_MEMORY_PATTERNS": "ort_memory_patterns",
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
    "HANSGATE_DISPARATE_IMPACT_RATIO": "disparate_impact_ratio",
    "HANSGATE_EQUALIZED_ODDS_GAP": "equalized_odds_gap",
    "HANSGATE_PRESENCE_BOUND": "presence_bound",
    "HANSGATE_PUBLIC_KEY": "public_key",
}

#: environment variable -> ServiceOptions field
SERVICE_ENV: dict[str, str] = {
    "HANSGATE_WORKERS": "workers",
    "HANSGATE_TIMEOUT_S": "timeout_s",
    "HANSGATE_MAX_CONCURRENCY": "max_concurrency",
    "HANSGATE_GRACE_S": "grace_s",
}


def _first_error(exc: ValidationError, names: Mapping[str, str]) -> ConfigError:
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    var = next((v for v, f in names.items() if f == field), field)
    msg = str(first["msg"]).removeprefix("Value error, ").splitlines()[0]
    got = first.get("input")
    shown = "" if var == "HANSGATE_RECEIPT_KEY" or not isinstance(got, str) else f" (got {got[:40]!r})"
    return ConfigError(f"{var}: {msg}{shown}")


class GatewayConfig(BaseModel):
    """Settings of one gateway worker (units in the names; defaults in the fields).

    ``provider``: ``auto`` (CUDA when usable, else CPU), ``cuda`` (refuse to start without it)
    or ``cpu``. ``max_batch``: rows one request may carry. ``microbatch_rows`` /
    ``microbatch_wait_ms``: adaptive batching across concurrent requests of a worker (a batch
    runs when it has this many rows or its first request waited this long; requests already
    queued join it up to ``merge_rows``, each of at least this many rows in an onnxruntime run
    of its own, not copied into a larger one). ``monitoring``:
    concept heads and metrics on (off only for the overhead benchmark).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    bundle: Path
    provider: Literal["auto", "cuda", "cpu"] = "auto"
    ort_threads: int = Field(0, ge=0, le=256, description="intra-op threads; 0 = cores / workers")
    #: onnxruntime's memory patterns: the intermediate tensors of a run are planned once per input shape and
    #: placed in one block, which makes runs faster but keeps that block (at the largest batch seen) in the
    #: arena beside the per-tensor allocations: off by default, where memory matters more (large models)
    ort_memory_patterns: bool = False
    max_batch: int = Field(256, ge=1, le=65536)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    microbatch_rows: int = Field(64, ge=1, le=65536)
    microbatch_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    monitoring: bool = True
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".hansgate" / "state")
    receipt_key: str | None = Field(None, min_length=16, max_length=4096, repr=False)
    receipt_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    store_size: int = Field(100_000, ge=1)
    recall_margin: float = Field(0.1, ge=0.0, le=1.0)
    tcav_margin: float = Field(0.15, ge=0.0, le=1.0)
    min_samples: int = Field(30, ge=1)
    presence_surge_factor: float = Field(2.0, gt=1.0)
    #: four-fifths rule: a subgroup's selection rate below this share of the highest is flagged
    disparate_impact_ratio: float = Field(0.8, gt=0.0, le=1.0)
    #: equalized odds: a TPR or FPR gap across an attribute's subgroups above this is flagged
    equalized_odds_gap: float = Field(0.1, gt=0.0, le=1.0)
    #: label-free recall is untrusted for a subgroup whose rows carry a watched concept more often than this
    presence_bound: float = Field(0.05, ge=0.0, le=1.0)
    #: Ed25519 public key file; when set, only bundles with a valid signature from it are served
    public_key: Path | None = None

    @field_validator("public_key")
    @classmethod
    def _readable_key(cls, v: Path | None) -> Path | None:
        if v is not None:
            from hansgate.signing import load_public_key

            try:
                load_public_key(v)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        return v

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
            raise _first_error(exc, ENV) from exc

    def merge_rows(self, row_bytes: int) -> int:
        """Rows queued requests may merge into (at least ``microbatch_rows``): up to the largest request the
        gateway accepts, by rows (``max_batch``) and by input bytes (``max_body_bytes`` over ``row_bytes``),
        so that merging never builds a batch larger than one request may be (memory), while requests that
        are each a full micro-batch (64-row ones) still share what a batch costs once."""
        return max(self.microbatch_rows, min(self.max_batch, self.max_body_bytes // max(1, row_bytes)))

    def threads(self, workers: int, cores: int | None = None) -> int:
        """Intra-op threads for one worker: the setting, or the cores shared out among workers."""
        if self.ort_threads:
            return self.ort_threads
        cores = cores or os.cpu_count() or 1
        return max(1, cores // max(1, workers))


class ServiceOptions(BaseModel):
    """BentoML service settings, fixed when the service class is defined (``HANSGATE_WORKERS``,
    ``HANSGATE_TIMEOUT_S``, ``HANSGATE_MAX_CONCURRENCY``), and ``HANSGATE_GRACE_S``: on SIGTERM
    each worker stops accepting and lets in-flight requests finish for at most this long
    (``bentoml serve --timeout-graceful-shutdown``); keep it below the orchestrator's grace
    period (Kubernetes' ``terminationGracePeriodSeconds``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    workers: int = Field(1, ge=1, le=64)
    timeout_s: int = Field(60, ge=1, le=3600)
    max_concurrency: int = Field(256, ge=1, le=65536)
    grace_s: int = Field(20, ge=1, le=3600)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceOptions":
        environ = os.environ if environ is None else environ
        values = {f: environ[v] for v, f in SERVICE_ENV.items() if environ.get(v)}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise _first_error(exc, SERVICE_ENV) from exc


def check_environment(environ: Mapping[str, str]) -> tuple[GatewayConfig, ServiceOptions]:
    """Validate every ``HANSGATE_*`` variable the way the workers will read it, before any starts.

    Refuses (``ConfigError``, one line) unknown ``HANSGATE_*`` names (a typo would otherwise be
    ignored silently), each bad value, and a state directory the workers cannot write.
    """
    known = set(ENV) | set(SERVICE_ENV) | set(limits.ENV)
    for var in sorted(v for v in environ if v.startswith("HANSGATE_")):
        if var not in known:
            close = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown setting {var}{hint}")
    options = ServiceOptions.from_env(environ)
    limits.ServingOptions.from_env(environ)
    cfg = GatewayConfig.from_env(environ)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cfg.state_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"HANSGATE_STATE_DIR: cannot write to {cfg.state_dir} ({exc.strerror or exc})") from exc
    return cfg, options


def serving_options(max_inflight: int, request_timeout_s: float) -> limits.ServingOptions:
    """``limits.ServingOptions.from_env`` for the module that defines the service (see ``service_options``)."""
    try:
        return limits.ServingOptions.from_env(None, max_inflight=max_inflight, request_timeout_s=request_timeout_s)
    except ConfigError as exc:
        print(f"hansgate: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None


def service_options(environ: Mapping[str, str] | None = None) -> ServiceOptions:
    """``ServiceOptions.from_env`` for the module that defines the service: a bad value ends the
    process with one line and ``EXIT_CONFIG`` instead of an import traceback."""
    try:
        return ServiceOptions.from_env(environ)
    except ConfigError as exc:
        print(f"hansgate: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None


def _parent_is_bentoml(pid: int) -> bool:
    """Whether ``pid`` is the BentoML arbiter (``bentoml serve``) that supervises this worker."""
    try:
        import psutil

        return any("bentoml" in part for part in psutil.Process(pid).cmdline())
    except Exception:  # no psutil, the parent is gone, or not ours to inspect: do not signal it
        return False


def refuse_start(exc: BaseException) -> NoReturn:
    """A worker that cannot start stops the whole server with one line (BentoML would restart it
    every few seconds forever): print the reason, SIGTERM the arbiter (which stops every worker
    cleanly; BentoML runs each worker in its own session, so a process-group signal would miss
    them), and exit with ``EXIT_CONFIG`` without a traceback."""
    reason = str(exc) if isinstance(exc, HansgateError) else f"{type(exc).__name__}: {exc}"
    print(f"hansgate: error: worker cannot start: {reason.splitlines()[0] if reason else type(exc).__name__}; "
          "stopping the server", file=sys.stderr, flush=True)
    parent = os.getppid()
    if _parent_is_bentoml(parent):
        os.kill(parent, signal.SIGTERM)
    os._exit(EXIT_CONFIG)


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
