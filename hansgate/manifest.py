"""The bundle manifest: a versioned pydantic model, the contract between the parts.

A bundle is a directory with ``model.onnx`` and ``manifest.json`` (DESIGN.md, "The
bundle"). ``refinement`` writes it, ``service`` and ``audit`` read it. This module
imports neither torch nor onnxruntime, so the service can use it on its hot path.

The model is also the semantic check of a manifest read from disk: every number is
finite, ranges are ordered, baselines are fractions keyed by declared names, and every
name that the gateway serves or exports as a Prometheus label (classes, concepts,
subgroup attributes and values, the method) comes from ``SAFE_NAME``'s alphabet, so a
hand-edited manifest cannot smuggle quotes, newlines or markup into responses, metrics
or the compliance page. ``graph.file`` and ``refined.file`` are plain file names inside the bundle.
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
    "UnitKind",
    "InsertedUnit",
    "RefinedModelSpec",
    "Manifest",
]

#: 1.1 adds ``calibration`` (temperature scaling); 1.2 adds ``verified_share``, each concept's
#: ``layer_reason`` and ``refined`` (the served model's torch weights); 1.3 adds vector scaling to
#: ``calibration`` (``family``, per-class ``scales`` and ``biases``, the fit's evidence); 1.4 adds the
#: ``clarc_projection`` unit (P-ClArC bundles carry their served weights); older bundles load unchanged
SCHEMA_VERSION = "1.4"
KNOWN_SCHEMA_VERSIONS = frozenset({"1.0", "1.1", "1.2", "1.3", "1.4"})


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
    """Post-hoc calibration (Guo et al. 2017) fitted at refine time on held-out labelled data.

    The hold-out is taken before verification, so it holds the model's mistakes too.

    The gateway's label-free recall estimate uses ``softmax(logits / temperature)`` when
    ``family`` is ``temperature`` (every bundle before schema 1.3), and ``softmax(scales * logits
    + biases)`` (vector scaling, one scale and bias per class, in the manifest's class order)
    when it is ``vector``; ``temperature`` is then the temperature the vector fit was shrunk
    towards. The expected calibration error (``bins`` equal-width bins) and the negative
    log-likelihood before and after are the evidence, on ``samples`` held-out images;
    ``objective`` is what the fit minimised, ``penalty`` vector scaling's ridge weight and
    ``cv_scores`` the cross-validated objective of each candidate the family was chosen from.
    """

    temperature: float = Field(gt=0.0)
    ece_before: Fraction
    ece_after: Fraction
    nll_before: float = Field(ge=0.0)
    nll_after: float = Field(ge=0.0)
    samples: int = Field(ge=2)
    bins: int = Field(ge=1)
    family: Literal["temperature", "vector"] = "temperature"
    scales: list[float] | None = Field(None, min_length=2, max_length=1000)
    biases: list[float] | None = Field(None, min_length=2, max_length=1000)
    penalty: float | None = Field(None, gt=0.0)
    objective: Literal["nll", "brier"] | None = None
    cv_scores: dict[Text, Annotated[float, Field(ge=0.0)]] | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _family_parameters(self) -> "CalibrationSpec":
        vector = self.scales is not None or self.biases is not None or self.penalty is not None
        if self.family == "temperature" and vector:
            raise ValueError("temperature calibration takes no scales, biases or penalty")
        if self.family == "vector":
            if self.scales is None or self.biases is None:
                raise ValueError("vector calibration needs scales and biases")
            if len(self.scales) != len(self.biases):
                raise ValueError(f"vector calibration has {len(self.scales)} scales but {len(self.biases)} biases")
        return self

    def is_extended(self) -> bool:
        """Whether it uses anything schema 1.3 added (``Manifest`` refuses that in older schemas)."""
        return self.family != "temperature" or self.objective is not None or self.cv_scores is not None


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


#: the refinement units a bundle can ask to rebuild (``nn.units.UNIT_KINDS``)
UnitKind = Literal["exposure_scale", "pca_exposure", "clarc_projection"]
_FILE_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$"
#: files a bundle reserves for itself (``bundle.MANIFEST_FILE``, ``signing.SIGNATURE_FILE``)
_RESERVED_FILES = frozenset({"manifest.json", "signature.json"})
_OPTION_KEY = r"^[a-z_]{1,32}$"


class InsertedUnit(_Strict):
    """One refinement unit inserted after the module ``layer`` (dotted path) of the source model.

    ``options`` are the unit's constructor shapes and flags (``nn.units.unit_options``); its
    tensors are in the refined weights file.
    """

    layer: str = Field(pattern=r"^[A-Za-z0-9_]{1,128}(\.[A-Za-z0-9_]{1,128}){0,63}$")
    kind: UnitKind
    options: dict[Annotated[str, Field(pattern=_OPTION_KEY)],
                  Annotated[bool, Field(strict=True)] | Annotated[int, Field(strict=True, ge=0, le=1 << 31)]
                  | Literal["linear", "ratio", "mean", "max", "none"]
                  | Annotated[list[Annotated[int, Field(strict=True, ge=1, le=1 << 31)]], Field(max_length=8)]
                  ] = Field(default_factory=dict, max_length=16)


class RefinedModelSpec(_Strict):
    """The served model as torch weights: rebuild it from the source model and check it against the graph.

    ``file`` (a plain file name in the bundle, safetensors, never pickle) holds the refined
    model's full state dict; ``inserted`` lists the units to insert into a fresh source model
    before loading it (empty for methods that only change weights). The audit rebuilds the
    module (``nn.units.rebuild``), verifies ``sha256`` and compares the module with the graph.
    """

    file: str = Field("refined.safetensors", pattern=_FILE_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: Literal["safetensors"] = "safetensors"
    inserted: list[InsertedUnit] = Field(default_factory=list, max_length=256)

    @field_validator("file")
    @classmethod
    def _safetensors(cls, v: str) -> str:
        if not v.endswith(".safetensors") or v in _RESERVED_FILES:
            raise ValueError(f"refined weights file {v!r} must be a plain '*.safetensors' file name")
        return v

    @field_validator("inserted")
    @classmethod
    def _distinct_layers(cls, v: list[InsertedUnit]) -> list[InsertedUnit]:
        layers = [u.layer for u in v]
        if len(set(layers)) != len(layers):
            raise ValueError("each layer takes at most one inserted unit")
        return v


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
    #: the served model's torch weights and how to rebuild it from the source model (``None``: audit by predictions)
    refined: RefinedModelSpec | None = None
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
        if self.calibration is not None and self.calibration.is_extended() and \
                self.schema_version in ("1.0", "1.1", "1.2"):
            raise ValueError("vector calibration (family, scales, biases, objective, cv_scores) needs manifest "
                             "schema 1.3 or later")
        if self.calibration is not None and self.calibration.scales is not None and \
                len(self.calibration.scales) != len(self.classes):
            raise ValueError(f"vector calibration has {len(self.calibration.scales)} scales for "
                             f"{len(self.classes)} classes")
        newer = self.verified_share is not None or any(c.layer_reason is not None for c in self.concepts)
        if newer and self.schema_version in ("1.0", "1.1"):
            raise ValueError("verified_share and layer_reason need manifest schema 1.2 or later")
        if self.refined is not None and self.schema_version in ("1.0", "1.1"):
            raise ValueError("refined (the served model's weights) needs manifest schema 1.2 or later")
        if self.refined is not None and self.schema_version in ("1.2", "1.3") and \
                any(u.kind == "clarc_projection" for u in self.refined.inserted):
            raise ValueError("a clarc_projection unit needs manifest schema 1.4 or later")
        if self.refined is not None and self.refined.file == self.graph.file:
            raise ValueError(f"refined.file and graph.file are both {self.graph.file!r}")
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
