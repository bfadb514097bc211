"""hansgate.service.errors: one mapping from hansgate errors to statuses and bounded reasons."""

from __future__ import annotations

from hansgate.errors import BundleError, DataError, ModelRunError, RequestError
from hansgate.service.errors import REASONS, STATUS_BY_REASON, rejection


def test_statuses():
    assert rejection(RequestError("x", "shape")).status == 422
    assert rejection(RequestError("x", "body_too_large")).status == 413
    assert rejection(RequestError("x", "forged_receipt")).status == 403
    assert rejection(RequestError("x", "unknown_request")).status == 404
    assert rejection(RequestError("x", "expired")).status == 410
    assert rejection(RequestError("x", "duplicate_feedback")).status == 409
    assert rejection(DataError("x")).status == 422
    assert rejection(BundleError("x")).status == 503
    assert rejection(ModelRunError("x")).status == 500


def test_unknown_reason_becomes_other_and_message_is_one_line():
    r = rejection(RequestError("first line\nsecond line", "made-up-reason"))
    assert r.reason == "other" and r.message == "first line" and r.body() == {"error": "other", "detail": "first line"}
    assert all(400 <= s < 600 for s in STATUS_BY_REASON.values()) and "other" in REASONS
