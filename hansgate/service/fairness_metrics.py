"""The fairness counters on /metrics (issue 15), bounded by the manifest like every other label.

=======================================================================  =================================
``hansgate_subgroup_predictions_total{attribute,value,class}``           rows of a subgroup predicted a class
``hansgate_expected_tp_total{attribute,value,class}`` (float)            sum of calibrated ``p_k`` over rows predicted ``k``
``hansgate_expected_fn_total{attribute,value,class}`` (float)            sum of calibrated ``p_k`` over rows predicted otherwise
``hansgate_subgroup_concept_present_total{attribute,value,concept}``     rows of a subgroup carrying a watched concept
=======================================================================  =================================

Attribute names and values, classes and concepts all come from the manifest; every series
is created at zero at start-up. prometheus_client is imported inside the class, after
BentoML has set ``PROMETHEUS_MULTIPROC_DIR`` (see ``metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from hansgate.manifest import Manifest
from hansgate.service.fairness import FairnessCounts

__all__ = ["FAIRNESS_METRIC_NAMES", "FairnessMetrics", "FairnessReadings"]

FAIRNESS_METRIC_NAMES = frozenset({
    "hansgate_subgroup_predictions_total", "hansgate_expected_tp_total", "hansgate_expected_fn_total",
    "hansgate_subgroup_concept_present_total",
})


@dataclass(frozen=True)
class FairnessReadings:
    """Counter values summed over workers: keys ``(attribute, value, class or concept)`` or ``(attribute, value)``."""

    predicted: dict[tuple[str, str, str], int]
    rows: dict[tuple[str, str], int]
    expected_tp: dict[tuple[str, str, str], float]
    expected_fn: dict[tuple[str, str, str], float]
    present: dict[tuple[str, str, str], int]


class FairnessMetrics:
    """Registers the fairness counters for one manifest and adds each batch's ``FairnessCounts``."""

    def __init__(self, manifest: Manifest, registry: Any | None = None) -> None:
        from prometheus_client import REGISTRY, Counter

        reg = REGISTRY if registry is None else registry
        self._groups = [(a.name, v) for a in manifest.subgroups for v in a.values]
        self.predicted = Counter("hansgate_subgroup_predictions", "Rows of a subgroup predicted each class",
                                 ["attribute", "value", "class"], registry=reg)
        self.expected_tp = Counter("hansgate_expected_tp", "Sum of the calibrated probability of the predicted "
                                   "class, per subgroup and class (label-free true positives)",
                                   ["attribute", "value", "class"], registry=reg)
        self.expected_fn = Counter("hansgate_expected_fn", "Sum of the calibrated probability of a class over rows "
                                   "predicted otherwise, per subgroup (label-free false negatives)",
                                   ["attribute", "value", "class"], registry=reg)
        self.present = Counter("hansgate_subgroup_concept_present", "Rows of a subgroup whose concept score "
                               "exceeds the presence threshold", ["attribute", "value", "concept"], registry=reg)
        for name, value in self._groups:
            for cls in manifest.classes:
                self.predicted.labels(name, value, cls)
                self.expected_tp.labels(name, value, cls)
                self.expected_fn.labels(name, value, cls)
            for concept in manifest.concepts:
                self.present.labels(name, value, concept.name)

    def observe(self, counts: FairnessCounts) -> None:
        """Add one batch's counts (keys already validated against the manifest)."""
        for (name, value, cls), n in counts.predicted.items():
            self.predicted.labels(name, value, cls).inc(n)
        for (name, value, cls), p in counts.expected_tp.items():
            self.expected_tp.labels(name, value, cls).inc(p)
        for (name, value, cls), p in counts.expected_fn.items():
            self.expected_fn.labels(name, value, cls).inc(p)
        for (name, value, concept), n in counts.present.items():
            if n:
                self.present.labels(name, value, concept).inc(n)

    @staticmethod
    def readings(samples: Iterable[tuple[str, dict[str, str], float]]) -> FairnessReadings:
        """Sum ``(sample name, labels, value)`` triples (as collected across workers) into readings."""
        predicted: dict[tuple[str, str, str], int] = {}
        rows: dict[tuple[str, str], int] = {}
        tp: dict[tuple[str, str, str], float] = {}
        fn: dict[tuple[str, str, str], float] = {}
        present: dict[tuple[str, str, str], int] = {}
        for name, labels, value in samples:
            if name not in FAIRNESS_METRIC_NAMES:
                continue
            group = (labels["attribute"], labels["value"])
            if name == "hansgate_subgroup_concept_present_total":
                key = (*group, labels["concept"])
                present[key] = present.get(key, 0) + int(round(value))
                continue
            key = (*group, labels["class"])
            if name == "hansgate_subgroup_predictions_total":
                predicted[key] = predicted.get(key, 0) + int(round(value))
                rows[group] = rows.get(group, 0) + int(round(value))
            elif name == "hansgate_expected_tp_total":
                tp[key] = tp.get(key, 0.0) + value
            else:
                fn[key] = fn.get(key, 0.0) + value
        return FairnessReadings(predicted, rows, tp, fn, present)
