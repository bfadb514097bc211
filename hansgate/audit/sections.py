"""The report sections that need predictions only: accuracy, subgroups, the headline, the bundle's concepts,
the bundle's calibration.

Each section is one function returning one typed dataclass; ``as_dict`` gives the section's
``report.json`` layout and is called only when the report is written (``audit.report``).
The torch sections (attributions, artifacts, concepts, influence) are in ``audit.explain``,
fairness in ``audit.fairness``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from hansgate.audit.compliance import ComplianceThresholds, TcavRow, tcav_table
from hansgate.audit.inputs import onnx_predictor, tcav_sign_counts
from hansgate.audit.roles import PredictFn
from hansgate.audit.subgroups import SubgroupAuditor
from hansgate.bundle import Bundle
from hansgate.calibration import (
    ReliabilityBin,
    calibrated_probabilities,
    expected_calibration_error,
    reliability_bins,
)
from hansgate.data.streaming import LazyImages
from hansgate.nn.training import forward_batch_size

__all__ = ["Skipped", "Accuracy", "Predictions", "AuditedImages", "streamed", "predictions_section", "SubgroupSection", "subgroups_section",
           "HeadlineRow", "headline_section", "BundleTcavSection", "bundle_tcav_section", "CalibrationSection",
           "calibration_section"]


#: The audited raw pixels: one array in memory, or images on disk read a batch at a time.
AuditedImages = np.ndarray | LazyImages


def streamed(fn: Callable[[np.ndarray], Any], x: AuditedImages) -> Any:
    """``fn(x)`` for an array; for images on disk, ``fn`` per batch (``nn.training.forward_batch_size``,
    at most 64 images, as refine streams them) and the outputs concatenated along the samples (a tuple
    of arrays stays a tuple), so that only one batch of images is ever held."""
    if not isinstance(x, LazyImages):
        return fn(x)
    batch = forward_batch_size(int(np.prod(tuple(x.shape[1:]))), cap=64)
    parts = [fn(b.numpy()) for b in x.iter_batches(batch, desc="audit")]
    if not parts:
        return fn(np.zeros((0, *x.shape[1:]), dtype=np.float32))
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(len(parts[0])))
    return np.concatenate([np.asarray(p) for p in parts])


@dataclass(frozen=True)
class Skipped:
    """A section that did not run, and why (``{"status": "skipped", "reason": ...}`` in the report)."""

    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"status": "skipped", "reason": self.reason}


@dataclass(frozen=True)
class Accuracy:
    value: float
    n: int


@dataclass(frozen=True)
class Predictions:
    """Logits ``[N, K]`` and predicted classes ``[N]`` per model role, and each model's accuracy on the audited data."""

    predicted: dict[str, np.ndarray]
    accuracy: dict[str, Accuracy]
    logits: dict[str, np.ndarray] = field(default_factory=dict)

    def take(self, index: np.ndarray) -> "Predictions":
        """The predictions of the samples at ``index`` (accuracy stays that of all audited samples)."""
        return Predictions({m: p[index] for m, p in self.predicted.items()}, self.accuracy,
                           {m: z[index] for m, z in self.logits.items()})


def predictions_section(predictors: Mapping[str, PredictFn], x: AuditedImages, y: np.ndarray) -> Predictions:
    """Run every model once on the raw pixels ``x`` (streamed from disk when lazy); every later section
    reuses these predictions."""
    names = list(predictors)
    outs = streamed(lambda b: tuple(np.asarray(predictors[m](b)) for m in names), x)
    logits = dict(zip(names, outs))
    predicted = {m: z.argmax(1) for m, z in logits.items()}
    accuracy = {m: Accuracy(float((p == y).mean()), int(len(y))) for m, p in predicted.items()}
    return Predictions(predicted, accuracy, logits)


@dataclass(frozen=True)
class CalibrationSection:
    """The bundle's calibration on the audited data: ECE and reliability bins without and with the manifest's
    calibration (the one the gateway uses: temperature ``T``, or vector scaling's per-class ``scales`` and
    ``biases``), beside the ECE the refine step measured on its held-out data. ``label`` names it in one line."""

    temperature: float
    bins: int
    ece_raw: float
    ece_calibrated: float
    manifest_ece_before: float
    manifest_ece_after: float
    reliability_raw: list[ReliabilityBin]
    reliability_calibrated: list[ReliabilityBin]
    status: str = "done"
    family: str = "temperature"
    scales: list[float] | None = None
    biases: list[float] | None = None
    penalty: float | None = None
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_section(bundle: Bundle, logits: np.ndarray, y: np.ndarray) -> CalibrationSection | Skipped:
    """Reliability of the audited bundle's probabilities, raw and under the manifest's calibration (Guo et al.
    2017: temperature or vector scaling, whichever the bundle records)."""
    spec = bundle.manifest.calibration
    if spec is None:
        return Skipped("the bundle records no calibration, neither temperature nor vector scaling (manifest schema "
                       "1.0, or refined with --calibration-share 0), so only its raw probabilities could be judged")
    vector = spec.family == "vector"
    raw = calibrated_probabilities(logits)
    calibrated = calibrated_probabilities(logits, spec.temperature, spec.scales if vector else None,
                                          spec.biases if vector else None)
    label = f"vector scaling, penalty {spec.penalty or 0:.3g}" if vector else f"T = {spec.temperature:.3g}"
    return CalibrationSection(spec.temperature, spec.bins, expected_calibration_error(raw, y, spec.bins),
                              expected_calibration_error(calibrated, y, spec.bins), spec.ece_before, spec.ece_after,
                              reliability_bins(raw, y, spec.bins), reliability_bins(calibrated, y, spec.bins),
                              family=spec.family, scales=spec.scales if vector else None,
                              biases=spec.biases if vector else None, penalty=spec.penalty, label=label)


@dataclass(frozen=True)
class SubgroupSection:
    """``SubgroupAuditor.result_`` (its documented JSON layout: per model, overall and per attribute value
    the accuracy, macro recall and per-class recall/precision rows with Wilson intervals, flags, delta)."""

    result: dict[str, Any]

    @property
    def order(self) -> list[str]:
        return list(self.result["order"])

    def group(self, model: str, attribute: str, value: str) -> dict[str, Any]:
        group: dict[str, Any] = self.result["models"][model]["attributes"][attribute][value]
        return group

    def as_dict(self) -> dict[str, Any]:
        return self.result


def subgroups_section(classes: list[str], y: np.ndarray, predictions: Predictions,
                      attributes: Mapping[str, np.ndarray], thresholds: ComplianceThresholds) -> SubgroupSection:
    """Recall/precision per subgroup and class of every model (paper 000, Sec. 5.2; ``audit.subgroups``)."""
    auditor = SubgroupAuditor(classes, thresholds).fit(y, predictions.predicted, attributes)
    return SubgroupSection(auditor.result_)


@dataclass(frozen=True)
class HeadlineRow:
    """A subgroup flagged for ``before`` (accuracy or a class's recall below overall) and what refinement did."""

    attribute: str
    value: str
    n: int
    accuracy_before: float | None
    accuracy_after: float | None
    macro_recall_before: float | None
    macro_recall_after: float | None
    classes_below_overall_before: list[str]
    classes_below_overall_after: list[str]
    raised: bool


def _below(group: Mapping[str, Any]) -> list[str]:
    return [c for c, r in group["classes"].items() if "recall_below_overall" in r["flags"]]


def headline_section(subgroups: SubgroupSection) -> list[HeadlineRow]:
    """The summary: groups flagged for ``before``; ``raised`` when ``after``'s macro recall is higher."""
    if "before" not in subgroups.result["models"]:
        return []
    rows = []
    for attr, groups in subgroups.result["models"]["before"]["attributes"].items():
        for value, g in groups.items():
            low = _below(g)
            if not (g["flagged"] or low):
                continue
            after = subgroups.group("after", attr, value)
            before_mr, after_mr = g["macro_recall"], after["macro_recall"]
            rows.append(HeadlineRow(
                attribute=attr, value=value, n=g["n"], accuracy_before=g["accuracy"]["value"],
                accuracy_after=after["accuracy"]["value"], macro_recall_before=before_mr,
                macro_recall_after=after_mr, classes_below_overall_before=low,
                classes_below_overall_after=_below(after),
                raised=bool(after_mr is not None and before_mr is not None and after_mr > before_mr)))
    return rows


@dataclass(frozen=True)
class BundleTcavSection:
    """TCAV of the bundle's own concept heads on the audited data, as the gateway's snapshot counts it."""

    concepts: list[str]
    rows: list[TcavRow]

    def as_dict(self) -> dict[str, Any]:
        return {"status": "done", "concepts": self.concepts, "rows": [r.as_dict() for r in self.rows],
                "flags": [r.as_dict() for r in self.rows if r.flags]}


def bundle_tcav_section(bundle: Bundle, x: AuditedImages, classes: list[str],
                        thresholds: ComplianceThresholds) -> BundleTcavSection | Skipped:
    """Sign counts of ``concept_sensitivity`` per predicted class (Kim et al. 2018, Eq. 2) against the
    manifest's baselines, through ``compliance.tcav_table`` -- the gateway's code."""
    manifest = bundle.manifest
    if not manifest.concepts:
        return Skipped("the bundle watches no concepts")
    names = [c.name for c in manifest.concepts]
    logits, sens = streamed(onnx_predictor(bundle, outputs=("logits", "concept_sensitivity")), x)
    positive, samples = tcav_sign_counts(logits, sens, names, classes)
    baseline = {(c.name, k): v for c in manifest.concepts for k, v in c.baseline_tcav.items()}
    return BundleTcavSection(names, tcav_table(positive, samples, baseline, thresholds))

