"""Request and response bodies of the gateway (pydantic; they make the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hansgate.manifest import Manifest

__all__ = ["PredictJSON", "Prediction", "PredictResponse", "FeedbackRequest", "FeedbackResponse",
           "ErrorResponse", "predict_json_schema", "feedback_json_schema"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _no_nulls(self) -> "_Body":
        # the documented schemas have no nullable field: an explicit null is refused, not read as absent
        nulls = sorted(f for f in self.model_fields_set if getattr(self, f) is None)
        if nulls:
            raise ValueError(f"{nulls[0]!r} may not be null (leave it out instead)")
        return self


class PredictJSON(_Body):
    """A JSON prediction request: exactly one of ``tensor`` or ``images``.

    ``tensor``: nested lists ``[N, C, H, W]`` (a batch) or ``[C, H, W]`` (one sample) of
    pixel values scaled to the manifest's ``input.value_range``; the gateway applies the
    manifest's mean/std. ``images``: base64-encoded PNG or JPEG files, resized and
    normalised per the manifest. Raw bodies work too: ``Content-Type: image/png`` or
    ``image/jpeg`` (one image) and ``application/x-npy`` (a float32 ``.npy`` array).
    """

    tensor: list[Any] | None = Field(None, description="[N,C,H,W] or [C,H,W] nested lists of numbers")
    images: list[str] | None = Field(None, description="base64 PNG/JPEG files", min_length=1)
    attributes: dict[str, str] | list[dict[str, str]] | None = Field(
        None, description="declared subgroup attributes: one object for every row, or a list with one per row")

    @model_validator(mode="after")
    def _exactly_one(self) -> "PredictJSON":
        if (self.tensor is None) == (self.images is None):
            raise ValueError("send exactly one of 'tensor' or 'images'")
        return self


class Prediction(BaseModel):
    """One row's prediction and the receipt to send back with its true label."""

    request_id: str = Field(description="id of this prediction; feedback refers to it")
    class_index: int
    class_name: str = Field(alias="class", serialization_alias="class")
    probabilities: list[float] = Field(description="softmax of the logits, in manifest class order")
    concept_scores: dict[str, float] = Field(default_factory=dict)
    receipt: str = Field(description="HMAC-signed receipt (request id, class, model hash, concept signs)")

    model_config = ConfigDict(populate_by_name=True)


class PredictResponse(BaseModel):
    request_id: str = Field(description="id of the HTTP request; each prediction's id extends it")
    model_sha256: str
    predictions: list[Prediction]


class FeedbackRequest(_Body):
    """Delayed ground truth for one prediction.

    Identify the prediction by ``receipt`` (works on any replica; preferred) or by
    ``request_id`` alone (looked up in the replica's store of recent predictions). ``label``
    is a class name from the manifest; ``attributes`` maps declared subgroup attributes to
    declared values. Each prediction takes feedback once.
    """

    receipt: str | None = Field(None, max_length=1024)
    request_id: str | None = Field(None, max_length=128)
    label: str = Field(max_length=256)
    attributes: dict[str, str] = Field(default_factory=dict, max_length=16)

    @model_validator(mode="after")
    def _identified(self) -> "FeedbackRequest":
        if self.receipt is None and self.request_id is None:
            raise ValueError("send 'receipt' or 'request_id'")
        return self


class FeedbackResponse(BaseModel):
    request_id: str
    predicted: str
    label: str
    correct: bool
    attributes: dict[str, str]


class ErrorResponse(BaseModel):
    error: str = Field(description="reason token, counted in hansgate_rejected_requests_total")
    detail: str


# -- the request schemas of the OpenAPI document, generated from the manifest ------------------------
def _tensor_schema(manifest: Manifest, max_batch: int) -> dict[str, Any]:
    spec = manifest.input
    lo, hi = (float(v) for v in spec.value_range)
    number = {"type": "number", "minimum": lo, "maximum": hi}
    row = {"type": "array", "minItems": spec.width, "maxItems": spec.width, "items": number}
    plane = {"type": "array", "minItems": spec.height, "maxItems": spec.height, "items": row}
    sample = {"type": "array", "minItems": spec.channels, "maxItems": spec.channels, "items": plane,
              "description": f"one sample [{spec.channels},{spec.height},{spec.width}]"}
    batch = {"type": "array", "minItems": 1, "maxItems": max_batch, "items": sample,
             "description": f"a batch [N,{spec.channels},{spec.height},{spec.width}], 1 <= N <= {max_batch}"}
    return {"oneOf": [batch, sample],
            "description": f"pixel values in the model's input range [{lo:g}, {hi:g}], before mean/std"}


def _attributes_schema(manifest: Manifest) -> dict[str, Any]:
    """Only the manifest's attributes, each with its declared values."""
    return {"type": "object", "additionalProperties": False, "maxProperties": 16,
            "properties": {a.name: {"type": "string", "enum": list(a.values)} for a in manifest.subgroups}}


def predict_json_schema(manifest: Manifest, max_batch: int) -> dict[str, Any]:
    """JSON schema of a ``/predict`` JSON body for this manifest: exactly one of ``tensor`` (shape and
    value range as item bounds and minimum/maximum) or ``images`` (1..``max_batch`` base64 files)."""
    images = {"type": "array", "minItems": 1, "maxItems": max_batch,
              "items": {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"},
              "description": "base64-encoded PNG or JPEG files; resized and normalised per the manifest"}
    attributes = _attributes_schema(manifest)
    per_row = {"type": "array", "minItems": 1, "maxItems": max_batch, "items": attributes}
    return {"type": "object", "title": "PredictJSON", "description": (PredictJSON.__doc__ or "").split("\n\n")[0],
            "properties": {"tensor": _tensor_schema(manifest, max_batch), "images": images,
                           "attributes": {"oneOf": [attributes, per_row],
                                          "description": "declared subgroup attributes: one object for every row, "
                                                         "or one object per row (counted, never stored)"}},
            "additionalProperties": False,
            "oneOf": [{"required": ["tensor"], "not": {"required": ["images"]}},
                      {"required": ["images"], "not": {"required": ["tensor"]}}]}


def feedback_json_schema(manifest: Manifest) -> dict[str, Any]:
    """JSON schema of a ``/feedback`` body: ``label`` one of the manifest's classes, ``attributes``
    only declared attributes with declared values, and a ``receipt`` or a ``request_id``."""
    attributes = _attributes_schema(manifest)
    return {"type": "object", "title": "FeedbackRequest", "description": (FeedbackRequest.__doc__ or "").split("\n\n")[0],
            "properties": {"receipt": {"type": "string", "maxLength": 1024},
                           "request_id": {"type": "string", "maxLength": 128},
                           "label": {"type": "string", "enum": list(manifest.classes)},
                           "attributes": attributes},
            "required": ["label"], "additionalProperties": False,
            "anyOf": [{"required": ["receipt"]}, {"required": ["request_id"]}]}
