"""HTTP statuses for ``hansgate.errors``, in one place.

Every refusal is a ``Rejection``: a status, a bounded ``reason`` token (the label the
``hansgate_rejected_requests_total`` counter uses) and a one-line message. Reasons not in
``REASONS`` are counted as ``other`` so that no request can mint a metric label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hansgate.errors import (
    BundleError,
    ConfigError,
    DataError,
    HansgateError,
    InputError,
    ModelRunError,
    RequestError,
)

__all__ = ["REASONS", "STATUS_BY_REASON", "Rejection", "rejection"]

#: reason -> HTTP status of every refusal the gateway counts
STATUS_BY_REASON: dict[str, int] = {
    "bad_json": 400,
    "bad_npy": 400,
    "bad_image": 400,
    "bad_request": 400,
    "unsupported_media_type": 415,
    "body_too_large": 413,
    "batch_too_large": 413,
    "empty_batch": 422,
    "shape": 422,
    "dtype": 422,
    "non_finite": 422,
    "out_of_range": 422,
    "non_finite_output": 422,
    "invalid": 422,
    "unknown_label": 422,
    "unknown_attribute": 422,
    "unknown_value": 422,
    "forged_receipt": 403,
    "wrong_model": 409,
    "duplicate_feedback": 409,
    "unknown_request": 404,
    "expired": 410,
    "slow_body": 408,
    "slow_headers": 408,
    "large_headers": 431,
    "overloaded": 429,
    "timeout": 504,
    "not_ready": 503,
    "model_error": 500,
    "other": 400,
}
REASONS: frozenset[str] = frozenset(STATUS_BY_REASON)


@dataclass(frozen=True)
class Rejection:
    status: int
    reason: str
    message: str

    def body(self) -> dict[str, str]:
        return {"error": self.reason, "detail": self.message}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0][:500] if text else type(exc).__name__
    # no object reprs ("<_io.BytesIO object at 0x...>") in a reply: they leak addresses and mean nothing
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "<object>", line)


def rejection(exc: HansgateError) -> Rejection:
    """Status, reason and one-line message for a hansgate error."""
    if isinstance(exc, RequestError):
        reason = exc.reason if exc.reason in REASONS else "other"
    elif isinstance(exc, DataError):
        reason = "invalid"
    elif isinstance(exc, (ConfigError, InputError)):
        reason = "bad_request"
    elif isinstance(exc, BundleError):
        reason = "not_ready"
    elif isinstance(exc, ModelRunError):
        reason = "model_error"
    else:
        reason = "other"
    return Rejection(STATUS_BY_REASON[reason], reason, _one_line(exc))
