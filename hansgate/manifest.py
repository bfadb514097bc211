"""The bundle manifest: a versioned pydantic model, the contract between the parts.

A bundle is a directory with ``model.onnx`` and ``manifest.json`` (DESIGN.md, "The
bundle"). ``refinement`` writes it, ``service`` and ``audit`` read it. This module
imports neither torch nor onnxruntime, so the service can use it on its hot path.

The model is also the semantic check of a manifest read from disk: every number is
finite, ranges are ordered, baselines are fractions keyed by declared names, and every
name that the gateway serves or exports as a Prometheus label (classes, concepts,
subgroup attributes and values, the method) comes from ``SAFE_NAME``'s alphabet, so a
hand-edited manifest cannot smuggle quotes, newlines or markup into responses, metrics
or the compliance page. ``graph.file`` is a plain file name inside the bundle.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SCHEMA_VERSION",
    "SAFE_NAME",
    "RESERVED_ATTRIBUTE",
    "KNOWN_SCHEMA_VERSIONS",
    "InputSpec",
    "SourceModel",
    "MethodSpec",
    "Evaluation",
    "CalibrationSpec",
    "ConceptSpec",
    "SubgroupAttribute",
    "GraphOutput",
    "GraphSpec",
    "Manifest",
]

#: 1.1 adds ``calibration`` (temperature scaling); 1.2 adds ``verified_share`` and each concept's
#: ``layer_reason``; older bundles load unchanged
SCHEMA_VERSION = "1.2"
KNOWN_SCHEMA_VERSIONS = frozenset({"1.0", "1.1", "1.2"})


#: names served in responses and exported as label values: letters, digits, ``_ . + -`` and single
#: inner spaces, 1-64 characters (no quotes, backslashes, control characters or markup)
SAFE_NAME = re.compile(r"\w(?:[\w.+-]| (?=[\w.+-]))*")
_MAX_NAME = 64
#: the ``attribute`` label of the feedback counter that counts every feedback (``service.metrics``)
RESERVED_ATTRIBUTE = "_all"
#: free text (paths, layer names): printable, one line
_TEXT = re.compile(r"[^\x00-\x1f\x7f]*")


def _safe_name(value: str) -> str:
    if not (0 < len(value) <= _MAX_NAME and SAFE_NAME.fullmatch(value) and value.isprintable()):
        raise ValueError(f"{value[:80]!r} is not a safe name (1-{_MAX_NAME} letters, digits, '_', '.', '+', '-' "
                         "and single inner spaces)")
    return value


def _text(value: str) -> str:
    if len(value) > 4096 or not _TEXT.fullmatch(value):
        raise ValueError(f"{value[:80]!r} has control characters or is longer than 4096 characters")
    return value


def _fraction(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{value} is not a fraction in [0, 1]")
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]
Text = Annotated[str, AfterValidator(_text)]
Fraction = Annotated[float, AfterValidator(_fraction)]


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN and +-inf are refused in every float field
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InputSpec(_Strict):
    """What ``model.onnx`` expects on its ``input``: ``[N, C, H, W]`` float32.

    ``mean``/``std`` are per channel and apply to pixel values scaled to
    ``value_range``; when ``normalization_in_graph`` is true the graph applies them
    itself and clients send raw scaled pixels.
    """

    channels: int = Field(gt=0, le=64)
    height: int = Field(gt=0, le=16384)
    width: int = Field(gt=0, le=16384)
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
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError(f"value_range {list(self.value_range)} is not ordered (low < high)")
        if self.color_mode == "L" and self.channels != 1:
            raise ValueError(f"color_mode 'L' needs 1 channel, not {self.channels}")
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class SourceModel(_Strict):
    """The third-party model the bundle was refined from."""

    spec: Text
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights: Text | None = None


class MethodSpec(_Strict):
    """The refinement method and every hyper-parameter it chose (JSON-serialisable)."""

    name: SafeName
    layers: list[Text] = Field(default_factory=list)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None


class Evaluation(_Strict):
    """Metrics of the source model (``before``) and the bundled model (``after``).

    Keys are metric names such as ``clean_acc`` and ``poisoned_acc`` (fractions);
    ``data`` says what they were measured on.
    """

    data: Text
    before: dict[Text, float]
    after: dict[Text, float]


class CalibrationSpec(_Strict):
    """Temperature scaling (Guo et al. 2017) fitted at refine time on held-out verified data.

    The gateway's label-free recall estimate uses ``softmax(logits / temperature)``; the
    expected calibration error (``bins`` equal-width bins) and the negative log-likelihood
    before and after are the evidence, on ``samples`` held-out images.
    """

    temperature: float = Field(gt=0.0)
    ece_before: Fraction
    ece_after: Fraction
    nll_before: float = Field(ge=0.0)
    nll_after: float = Field(ge=0.0)
    samples: int = Field(ge=2)
    bins: int = Field(ge=1)


class ConceptSpec(_Strict):
    """A watched concept: a unit CAV at ``layer`` and its deployment baselines."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    layer: Text
    cav_kind: Text
    pooling: Text = "mean"
    baseline_tcav: dict[str, Fraction] = Field(default_factory=dict)
    presence_threshold: float = 0.0
    sensitivity_tolerance: float = Field(1e-3, ge=0.0)
    #: how the graph computes ``concept_sensitivity`` (refinement.concept_heads): exact JVP or finite differences
    sensitivity_method: Literal["jvp", "central", "forward"] = "central"
    #: why ``layer`` was watched (automatic choice or the user's, and any warning about it)
    layer_reason: Text | None = None


class SubgroupAttribute(_Strict):
    """A declared subgroup attribute, its allowed values and baseline recall.

    ``baseline_recall[value][class_name]`` is recall on the evaluation data.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_]{1,64}$")
    values: list[SafeName] = Field(min_length=1, max_length=64)
    baseline_recall: dict[str, dict[str, Fraction]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == RESERVED_ATTRIBUTE:
            raise ValueError(f"attribute name {RESERVED_ATTRIBUTE!r} is reserved")
        return v

    @field_validator("values")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("attribute values must be unique")
        return v

    @model_validator(mode="after")
    def _declared_values(self) -> "SubgroupAttribute":
        unknown = sorted(set(self.baseline_recall) - set(self.values))
        if unknown:
            raise ValueError(f"baseline_recall has undeclared values {unknown[:5]} of attribute {self.name!r}")
        return self


class GraphOutput(_Strict):
    """One graph output; ``shape`` uses ``None`` for the dynamic batch axis."""

    name: Literal["logits", "concept_scores", "concept_sensitivity"]
    shape: list[Annotated[int, Field(gt=0)] | None]


class GraphSpec(_Strict):
    """The ONNX file, its hash and the signature the service checks at load time."""

    #: a plain file name inside the bundle directory (no path separators, not hidden)
    file: str = Field("model.onnx", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=1, le=1000)
    input_name: Text = "input"
    outputs: list[GraphOutput]
    max_abs_logit_diff: float = Field(ge=0.0, description="torch vs onnxruntime on real samples")


class Manifest(_Strict):
    """Everything a reader needs to trust and use ``model.onnx``."""

    schema_version: str = SCHEMA_VERSION
    hansgate_version: str = Field(pattern=r"^[A-Za-z0-9.+_-]{1,64}$")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    classes: list[SafeName] = Field(min_length=2, max_length=1000)
    input: InputSpec
    source_model: SourceModel
    method: MethodSpec
    evaluation: Evaluation | None = None
    concepts: list[ConceptSpec] = Field(default_factory=list, max_length=64)
    subgroups: list[SubgroupAttribute] = Field(default_factory=list, max_length=16)
    calibration: CalibrationSpec | None = None
    #: share of the supplied refinement data the source model predicted correctly (the verified set)
    verified_share: Fraction | None = None
    graph: GraphSpec

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.calibration is not None and self.schema_version == "1.0":
            raise ValueError("calibration needs manifest schema 1.1 or later")
        newer = self.verified_share is not None or any(c.layer_reason is not None for c in self.concepts)
        if newer and self.schema_version in ("1.0", "1.1"):
            raise ValueError("verified_share and layer_reason need manifest schema 1.2 or later")
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError("concept names must be unique")
        attributes = [a.name for a in self.subgroups]
        if len(set(attributes)) != len(attributes):
            raise ValueError("subgroup attribute names must be unique")
        classes = set(self.classes)
        for c in self.concepts:
            if unknown := sorted(set(c.baseline_tcav) - classes):
                raise ValueError(f"concept {c.name!r} has a baseline TCAV for undeclared classes {unknown[:5]}")
        for a in self.subgroups:
            for value, per_class in a.baseline_recall.items():
                if unknown := sorted(set(per_class) - classes):
                    raise ValueError(f"baseline recall of {a.name}={value} names undeclared classes {unknown[:5]}")
        return self

    def expected_outputs(self) -> dict[str, list[int | None]]:
        """The output signature the graph must have, derived from classes and concepts."""
        k, m = len(self.classes), len(self.concepts)
        out: dict[str, list[int | None]] = {"logits": [None, k]}
        if m:
            out["concept_scores"] = [None, m]
            out["concept_sensitivity"] = [None, m, k]
        return out
