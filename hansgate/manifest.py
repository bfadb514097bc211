"""The bundle manifest: a versioned pydantic model, the contract between the parts.

A bundle is a directory with ``model.onnx`` and ``manifest.json`` (DESIGN.md, "The
bundle"). ``refinement`` writes it, ``service`` and ``audit`` read it. This module
imports neither torch nor onnxruntime, so the service can use it on its hot path.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SCHEMA_VERSION",
    "KNOWN_SCHEMA_VERSIONS",
    "InputSpec",
    "SourceModel",
    "MethodSpec",
    "Evaluation",
    "ConceptSpec",
    "SubgroupAttribute",
    "GraphOutput",
    "GraphSpec",
    "Manifest",
]

SCHEMA_VERSION = "1.0"
KNOWN_SCHEMA_VERSIONS = frozenset({"1.0"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """What ``model.onnx`` expects on its ``input``: ``[N, C, H, W]`` float32.

    ``mean``/``std`` are per channel and apply to pixel values scaled to
    ``value_range``; when ``normalization_in_graph`` is true the graph applies them
    itself and clients send raw scaled pixels.
    """

    channels: int = Field(gt=0)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float]
    std: list[float]
    normalization_in_graph: bool = False
    color_mode: Literal["L", "RGB"] = "L"

    @model_validator(mode="after")
    def _per_channel(self) -> "InputSpec":
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class SourceModel(_Strict):
    """The third-party model the bundle was refined from."""

    spec: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights: str | None = None


class MethodSpec(_Strict):
    """The refinement method and every hyper-parameter it chose (JSON-serialisable)."""

    name: str
    layers: list[str] = Field(default_factory=list)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None


class Evaluation(_Strict):
    """Metrics of the source model (``before``) and the bundled model (``after``).

    Keys are metric names such as ``clean_acc`` and ``poisoned_acc`` (fractions);
    ``data`` says what they were measured on.
    """

    data: str
    before: dict[str, float]
    after: dict[str, float]


class ConceptSpec(_Strict):
    """A watched concept: a unit CAV at ``layer`` and its deployment baselines."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    layer: str
    cav_kind: str
    pooling: str = "mean"
    baseline_tcav: dict[str, float] = Field(default_factory=dict)
    presence_threshold: float = 0.0
    sensitivity_tolerance: float = 1e-3
    #: how the graph computes ``concept_sensitivity`` (refinement.concept_heads): exact JVP or finite differences
    sensitivity_method: Literal["jvp", "central", "forward"] = "central"


class SubgroupAttribute(_Strict):
    """A declared subgroup attribute, its allowed values and baseline recall.

    ``baseline_recall[value][class_name]`` is recall on the evaluation data.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_]{1,64}$")
    values: list[str] = Field(min_length=1, max_length=64)
    baseline_recall: dict[str, dict[str, float]] = Field(default_factory=dict)

    @field_validator("values")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("attribute values must be unique")
        return v


class GraphOutput(_Strict):
    """One graph output; ``shape`` uses ``None`` for the dynamic batch axis."""

    name: str
    shape: list[int | None]


class GraphSpec(_Strict):
    """The ONNX file, its hash and the signature the service checks at load time."""

    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int
    input_name: str = "input"
    outputs: list[GraphOutput]
    max_abs_logit_diff: float = Field(ge=0.0, description="torch vs onnxruntime on real samples")


class Manifest(_Strict):
    """Everything a reader needs to trust and use ``model.onnx``."""

    schema_version: str = SCHEMA_VERSION
    hansgate_version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    classes: list[str] = Field(min_length=2, max_length=1000)
    input: InputSpec
    source_model: SourceModel
    method: MethodSpec
    evaluation: Evaluation | None = None
    concepts: list[ConceptSpec] = Field(default_factory=list, max_length=64)
    subgroups: list[SubgroupAttribute] = Field(default_factory=list, max_length=16)
    graph: GraphSpec

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v

    @model_validator(mode="after")
    def _unique_concepts(self) -> "Manifest":
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError("concept names must be unique")
        return self

    def expected_outputs(self) -> dict[str, list[int | None]]:
        """The output signature the graph must have, derived from classes and concepts."""
        k, m = len(self.classes), len(self.concepts)
        out: dict[str, list[int | None]] = {"logits": [None, k]}
        if m:
            out["concept_scores"] = [None, m]
            out["concept_sensitivity"] = [None, m, k]
        return out
