"""One audit: inputs -> one function per report section -> ``AuditReport`` (JSON only when written).

Models. The audited bundle runs through onnxruntime (``after``). The comparison model
(``before``) is, in order of preference, a second bundle (``before_bundle``), or the
bundle's source model (``manifest.source_model``, weights found next to the bundle or
given explicitly, loaded without unpickling and checked against the manifest's hash).

Attributions need a torch model. A bundle of schema 1.2 carries the served model's torch
weights (``manifest.refined``): the audit rebuilds that module, checks it against ``model.onnx``
(``audit.served``; a tampered weights file or a disagreement refuses the audit) and explains
it -- heatmaps beside the source model's, TCAV and influence on the served model. Callers that
hold the refined torch model (the demo) pass it as ``after_torch`` instead. Bundles without
refined weights (schema 1.0/1.1) are audited by their predictions (subgroups, fairness, flip
rates, accuracy drops), their explanations are of the source model, and the report says so
(``served``). Every heatmap and TCAV figure names the model it explains.

The sections, in the order they run: ``sections.predictions_section`` (accuracy),
``subgroups_section``, ``headline_section``, ``fairness.fairness_section``,
``explain.attributions_section``, ``artifacts_section``, ``concepts_section``,
``influence_section``, ``sections.bundle_tcav_section``, ``calibration_section`` (skipped for
bundles that record no temperature); before them ``served.served_model`` obtains the served model.

Memory. ``x`` is held in memory. When the data are larger than a caller wants to hold,
``images`` carries all of them on disk (``data.streaming.LazyImages``) and ``x`` a seeded subset
(``explained``: its positions in ``images``): predictions, subgroups, fairness, calibration and the
bundle's TCAV then stream over every image a batch at a time, and the torch sections (heatmaps,
artifact tests, concepts, influence) work on the held subset.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import hansgate
from hansgate.audit.artifact_tests import (
    ArtifactTests,
    HeatmapFigure,
    resolve_artifacts,
)
from hansgate.audit.concepts import Localisation
from hansgate.audit.config import AuditConfig
from hansgate.audit.explain import (
    AttributionSection,
    ConceptSection,
    InfluenceSection,
    artifacts_section,
    attributions_section,
    concepts_section,
    influence_section,
)
from hansgate.audit.fairness import FairnessSection, fairness_section
from hansgate.audit.roles import ModelInfo, audit_models
from hansgate.audit.served import ServedModel, served_model
from hansgate.audit.sections import (
    Accuracy,
    BundleTcavSection,
    CalibrationSection,
    HeadlineRow,
    Predictions,
    Skipped,
    SubgroupSection,
    bundle_tcav_section,
    calibration_section,
    headline_section,
    predictions_section,
    subgroups_section,
)
from hansgate.bundle import Bundle
from hansgate.data.streaming import LazyImages

__all__ = ["AuditConfig", "AuditInputs", "AuditReport", "FigureData", "run_audit", "LIMITATIONS"]

SCHEMA = "hansgate.audit/1"


@dataclass
class AuditInputs:
    """Loaded inputs. ``x`` float ``[N, C, H, W]`` in the manifest's value range, ``y`` ``[N]``; torch models
    (``source_model``, ``after_torch``) take inputs normalised with the manifest's mean/std."""

    bundle: Bundle
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    attributes: dict[str, np.ndarray]
    data_path: str
    attributes_path: str
    before_bundle: Bundle | None = None
    source_model: nn.Module | None = None
    source_weights: str | None = None
    after_torch: nn.Module | None = None
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    train_artifact: np.ndarray | None = None
    region_mask: torch.Tensor | None = None
    region_mask_name: str | None = None
    notes: list[str] = field(default_factory=list)
    images: LazyImages | None = None
    explained: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.images is None) != (self.explained is None):
            raise ValueError("give both images (all audited data, on disk) and explained (x's positions in them)")
        n = len(self.images) if self.images is not None else len(self.x)
        if len(self.y) != n or any(len(v) != n for v in self.attributes.values()):
            raise ValueError(f"labels ({len(self.y)}) and attributes must describe every one of the {n} audited samples")
        if self.explained is not None and len(self.explained) != len(self.x):
            raise ValueError(f"explained lists {len(self.explained)} positions for {len(self.x)} held samples")

    def summary(self) -> dict[str, Any]:
        """The report's ``inputs`` section."""
        manifest = self.bundle.manifest
        return {"bundle": str(self.bundle.path), "bundle_sha256": manifest.graph.sha256,
                "bundle_method": manifest.method.name, "data": self.data_path,
                "attributes_file": self.attributes_path, "n_samples": int(len(self.y)), "classes": self.classes,
                "attributes": {a: {str(v): int((vals == v).sum()) for v in sorted(set(vals.tolist()))}
                               for a, vals in self.attributes.items()},
                "train_data": self.train_x is not None, "explained_samples": int(len(self.x)),
                "notes": self.notes}


@dataclass(frozen=True)
class FigureData:
    """The arrays the figures are drawn from (not part of ``report.json``; the figures' numbers are)."""

    heatmaps: HeatmapFigure | None = None
    heatmap_samples: list[int] = field(default_factory=list)
    methods: HeatmapFigure | None = None
    artifact_heatmaps: dict[str, HeatmapFigure] = field(default_factory=dict)
    localisation: dict[str, Localisation] = field(default_factory=dict)


@dataclass
class AuditReport:
    """Every section of one audit, typed; ``as_dict`` is ``report.json`` without its ``figures``."""

    inputs: dict[str, Any]
    config: AuditConfig
    models: dict[str, ModelInfo]
    accuracy: dict[str, Accuracy]
    headline: list[HeadlineRow]
    subgroups: SubgroupSection
    fairness: FairnessSection
    attributions: AttributionSection | Skipped
    artifact_tests: ArtifactTests
    concepts: ConceptSection | Skipped
    bundle_tcav: BundleTcavSection | Skipped
    influence: InfluenceSection | Skipped
    calibration: CalibrationSection | Skipped
    served: ServedModel = field(default_factory=lambda: ServedModel("absent", reason="not determined"))
    timing_seconds: dict[str, float] = field(default_factory=dict)

    def figure_data(self) -> FigureData:
        att = self.attributions
        return FigureData(
            heatmaps=att.heatmaps if isinstance(att, AttributionSection) else None,
            heatmap_samples=[s.index for s in att.samples[:8]] if isinstance(att, AttributionSection) else [],
            methods=att.methods if isinstance(att, AttributionSection) else None,
            artifact_heatmaps=self.artifact_tests.heatmaps,
            localisation=self.concepts.evidence.localisation if isinstance(self.concepts, ConceptSection) else {})

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "hansgate_version": hansgate.__version__, "inputs": self.inputs,
            "config": self.config.model_dump(), "models": {k: m.as_dict() for k, m in self.models.items()},
            "accuracy": {k: asdict(a) for k, a in self.accuracy.items()},
            "headline": [asdict(h) for h in self.headline], "subgroups": self.subgroups.as_dict(),
            "fairness": self.fairness.as_dict(), "attributions": self.attributions.as_dict(),
            "artifact_tests": self.artifact_tests.as_dict(), "concepts": self.concepts.as_dict(),
            "bundle_tcav": self.bundle_tcav.as_dict(), "influence": self.influence.as_dict(),
            "calibration": self.calibration.as_dict(), "served": self.served.as_dict(), "limitations": LIMITATIONS,
            "timing_seconds": self.timing_seconds}


def run_audit(inputs: AuditInputs, config: AuditConfig | None = None,
              progress: Callable[[str], None] | None = None) -> AuditReport:
    """Run every section once, in order; each is timed."""
    cfg = config or AuditConfig()
    say = progress or (lambda s: None)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        say(name.replace("_", " "))
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    spec = inputs.bundle.manifest.input
    classes, x, y = inputs.classes, inputs.x, inputs.y
    y_np = y.numpy()
    every = inputs.images if inputs.images is not None else x.numpy()  # streamed from disk when lazy
    thresholds = cfg.thresholds()
    served = timed("served_model", lambda: served_model(inputs.bundle, x, inputs.source_model, inputs.after_torch))
    models = audit_models(inputs.bundle, inputs.before_bundle, inputs.source_model, inputs.source_weights,
                          served.module)
    artifacts = resolve_artifacts(list(cfg.artifacts), list(cfg.patches))

    t0 = time.perf_counter()
    say("predictions")
    predictions = predictions_section(models.predictors, every, y_np)
    say("subgroups")
    subgroups = subgroups_section(classes, y_np, predictions, inputs.attributes, thresholds)
    timings["subgroups"] = time.perf_counter() - t0  # predictions included
    fairness = timed("fairness", lambda: fairness_section(y_np, predictions.predicted, inputs.attributes, classes,
                                                          cfg.parity_bound, cfg.odds_margin, cfg.min_samples, cfg.z))
    ex_y, ex_pred, ex_attr = _explained(inputs, predictions)
    attributions = timed("attributions", lambda: attributions_section(
        x, ex_y, classes, ex_pred, models.torch, spec, cfg, inputs.region_mask, inputs.region_mask_name,
        positions=inputs.explained))
    arts = timed("artifact_tests", lambda: artifacts_section(models.predictors, models.torch, x, ex_y, classes,
                                                             ex_pred, artifacts, spec, cfg))
    concepts = timed("concepts", lambda: concepts_section(models.torch, x, ex_y, classes, ex_attr, artifacts,
                                                          spec, cfg))
    if isinstance(concepts, ConceptSection):  # the artifact table shows each artifact concept's TCAV
        for art in artifacts:
            arts.artifacts[art.name].tcav = concepts.artifact_tcav(art.name)
    influence = timed("influence", lambda: influence_section(
        models.torch, x, ex_y, inputs.train_x, inputs.train_y, inputs.train_artifact, artifacts, spec, cfg))
    bundle_tcav = timed("bundle_tcav", lambda: bundle_tcav_section(inputs.bundle, every, classes, thresholds))
    calibration = calibration_section(inputs.bundle, predictions.logits["after"], y_np)
    timings["total"] = time.perf_counter() - t_start
    summary = inputs.summary()
    if served.module is None:
        summary["notes"] = [*summary["notes"], served.reason]
    return AuditReport(inputs=summary, config=cfg, models=models.info, accuracy=predictions.accuracy,
                       headline=headline_section(subgroups), subgroups=subgroups, fairness=fairness,
                       attributions=attributions, artifact_tests=arts, concepts=concepts, bundle_tcav=bundle_tcav,
                       influence=influence, calibration=calibration, served=served, timing_seconds=timings)


def _explained(inputs: AuditInputs, predictions: Predictions
               ) -> tuple[torch.Tensor, Predictions, dict[str, np.ndarray]]:
    """Labels, predictions and attributes of the held samples ``inputs.x`` (all samples unless streamed)."""
    if inputs.explained is None:
        return inputs.y, predictions, inputs.attributes
    idx = inputs.explained
    return (inputs.y[torch.as_tensor(idx)], predictions.take(idx),
            {a: v[idx] for a, v in inputs.attributes.items()})


LIMITATIONS = [
    "An audit only finds the shortcuts it tests for: attributions, concept rankings and influence rankings "
    "revealed a spurious signal only when it was known and tested explicitly (Adebayo et al., paper 003). "
    "Artifacts that are not in the tested list, and attributes that are not declared, stay invisible here.",
    "Subgroup figures describe the audited data set only; small subgroups have wide intervals and are not flagged "
    "below the minimum sample count.",
    "Heatmaps, relevance shares, concept evidence and influence are computed on torch models: the served model "
    "rebuilt from the bundle's refined weights and checked against its graph, beside the source model; a bundle "
    "without refined weights (schema 1.0/1.1) is judged by its predictions and its explanations are of the "
    "source model. Each figure names the model it explains.",
    "The influence ranking uses a linear student of the network on randomly projected embeddings; its fidelity "
    "is reported and bounds how far the ranking speaks for the network itself.",
    "Demographic parity and equalized odds are measured one class against the rest on the audited data; the "
    "four-fifths rule is a screening heuristic, not a legal finding. Demographic parity ignores base rates: "
    "a subgroup with more true members of a class is expected to be selected more often.",
    "The calibration curve judges the bundle's probabilities on the audited data; where that data carries a "
    "shortcut the temperature was not fitted on, calibration does not transfer.",
]
