"""Recall and precision per subgroup and class (paper 000, Sec. 5.2, Fig. 7, Supp. I.1).

The bookkeeping goes through fairlearn's ``MetricFrame``: per subgroup it counts,
for every class ``c`` taken one-vs-rest, the true positives, false negatives, false
positives and true negatives. Everything else is derived from these integer counts by
``audit.compliance`` -- the same torch-free code the service's compliance snapshot uses on
its Prometheus counters, so the report and the gateway agree on the same data:

- recall ``tp / (tp + fn)`` and precision ``tp / (tp + fp)`` per (subgroup, class), each with
  its Wilson score interval and sample counts (``compliance.subgroup_table``);
- a row is flagged ``recall_below_overall`` when its recall is more than ``recall_margin``
  below the class's overall recall with at least ``min_samples`` positives (and
  ``recall_below_baseline`` against the manifest's baseline recall, when given);
- per subgroup, the accuracy (= micro-averaged recall, ``sum tp / n``) with its interval and
  the macro recall; the subgroup is flagged when its accuracy is more than ``recall_margin``
  below the overall accuracy (same ``min_samples`` rule).

This module is torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
from fairlearn.metrics import MetricFrame

from hansgate.audit.compliance import (
    ALL,
    ComplianceThresholds,
    Outcomes,
    SubgroupRow,
    rate,
    subgroup_table,
)

if TYPE_CHECKING:
    import pandas as pd  # fairlearn's MetricFrame rows

__all__ = [
    "class_counts",
    "subgroup_counts",
    "outcome_counts",
    "SubgroupAuditor",
    "recall_by_group",
]

#: Column order of a count table ``[K, 4]``.
COUNT_FIELDS = ("tp", "fn", "fp", "tn")


def _count(cls: int, field: str) -> Callable[[np.ndarray, np.ndarray], int]:
    def metric(y_true: np.ndarray, y_pred: np.ndarray) -> int:
        t, p = np.asarray(y_true) == cls, np.asarray(y_pred) == cls
        return int({"tp": t & p, "fn": t & ~p, "fp": ~t & p, "tn": ~t & ~p}[field].sum())

    return metric


def _metrics(n_classes: int) -> dict[str, Callable[[np.ndarray, np.ndarray], int]]:
    return {f"{f}_{c}": _count(c, f) for c in range(n_classes) for f in COUNT_FIELDS}


def _table(row: pd.Series, n_classes: int) -> np.ndarray:
    return np.array([[int(row[f"{f}_{c}"]) for f in COUNT_FIELDS] for c in range(n_classes)], dtype=np.int64)


def class_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """One-vs-rest counts ``[K, 4]`` (tp, fn, fp, tn per class) over all samples."""
    frame = MetricFrame(metrics=_metrics(n_classes), y_true=np.asarray(y_true), y_pred=np.asarray(y_pred),
                        sensitive_features={"all": np.zeros(len(y_true), dtype=int)})
    return _table(frame.overall, n_classes)


def subgroup_counts(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                    n_classes: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Overall counts ``[K, 4]`` and ``{group value: counts [K, 4]}`` through one ``MetricFrame``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    frame = MetricFrame(metrics=_metrics(n_classes), y_true=y_true, y_pred=y_pred,
                        sensitive_features={"group": np.asarray(groups).astype(str)})
    by_group = {str(v): _table(frame.by_group.loc[v], n_classes) for v in frame.by_group.index}
    return _table(frame.overall, n_classes), by_group


def outcome_counts(y_true: np.ndarray, y_pred: np.ndarray, attributes: Mapping[str, np.ndarray],
                   classes: list[str]) -> dict[tuple[str, str, str], Outcomes]:
    """``{(attribute, value, class): Outcomes}`` plus the overall rows ``(ALL, ALL, class)``.

    The keys and counts are what ``compliance.subgroup_table`` (and the service's counters) use.
    """
    k = len(classes)
    out: dict[tuple[str, str, str], Outcomes] = {}
    overall = class_counts(y_true, y_pred, k)
    for c, name in enumerate(classes):
        out[(ALL, ALL, name)] = Outcomes(*(int(v) for v in overall[c]))
    for attr, values in attributes.items():
        _, groups = subgroup_counts(y_true, y_pred, values, k)
        for value, counts in groups.items():
            for c, name in enumerate(classes):
                out[(attr, value, name)] = Outcomes(*(int(v) for v in counts[c]))
    return out


class SubgroupAuditor:
    """Subgroup recall/precision of one or more models on the same labelled data.

    ``fit(y_true, predictions, attributes)`` with ``predictions = {model name: y_pred [N]}`` (in
    order: the first is "before", the last "after") and ``attributes = {attribute: values [N]}``.
    Learned: ``counts_`` (per model, the ``compliance`` count mapping) and ``result_``, a plain
    JSON-able dict with, per model, the overall figures and per attribute value the accuracy,
    macro recall and per-class rows (``SubgroupRow.as_dict``), the flags, and the ``delta``
    (after - before) when there are several models.
    """

    def __init__(self, classes: list[str], thresholds: ComplianceThresholds | None = None,
                 baseline_recall: Mapping[tuple[str, str], Mapping[str, float]] | None = None) -> None:
        self.classes = list(classes)
        self.thresholds = thresholds or ComplianceThresholds()
        self.baseline_recall = baseline_recall

    def fit(self, y_true: np.ndarray, predictions: dict[str, np.ndarray],
            attributes: Mapping[str, np.ndarray]) -> "SubgroupAuditor":
        th = self.thresholds
        self.counts_: dict[str, dict[tuple[str, str, str], Outcomes]] = {}
        models: dict[str, Any] = {}
        flags: list[dict[str, Any]] = []
        for model, y_pred in predictions.items():
            counts = outcome_counts(y_true, y_pred, attributes, self.classes)
            self.counts_[model] = counts
            rows = subgroup_table(counts, self.classes, self.baseline_recall, th)
            overall_acc = self._accuracy(counts, ALL, ALL)
            res: dict[str, Any] = {"overall": self._group(rows, counts, ALL, ALL, overall_acc), "attributes": {}}
            for attr, values in attributes.items():
                res["attributes"][attr] = {}
                for value in sorted({str(v) for v in np.asarray(values).astype(str)}):
                    g = self._group(rows, counts, attr, value, overall_acc)
                    res["attributes"][attr][value] = g
                    if g["flagged"]:
                        flags.append({"model": model, "attribute": attr, "value": value, "class": None,
                                      "metric": "accuracy", "figure": g["accuracy"]["value"], "gap": g["accuracy_gap"],
                                      "flags": ["accuracy_below_overall"]})
                    for cls, row in g["classes"].items():
                        if row["flags"]:
                            flags.append({"model": model, "attribute": attr, "value": value, "class": cls,
                                          "metric": "recall", "figure": row["recall"]["value"],
                                          "gap": row["recall_gap"], "flags": row["flags"]})
            models[model] = res
        names = list(predictions)
        self.result_: dict[str, Any] = {
            "thresholds": {"recall_margin": th.recall_margin, "min_samples": th.min_samples, "z": th.z},
            "models": models, "order": names, "flags": flags}
        if len(names) >= 2:
            self.result_["delta"] = self._delta(models[names[0]], models[names[-1]])
            self.result_["delta_models"] = [names[0], names[-1]]
        return self

    def _accuracy(self, counts: Mapping[tuple[str, str, str], Outcomes], attr: str, value: str) -> dict[str, Any]:
        outs = [counts[(attr, value, c)] for c in self.classes if (attr, value, c) in counts]
        return rate(sum(o.tp for o in outs), sum(o.positives for o in outs), self.thresholds.z).as_dict()

    def _group(self, rows: list[SubgroupRow], counts: Mapping[tuple[str, str, str], Outcomes], attr: str, value: str,
               overall_acc: dict[str, Any]) -> dict[str, Any]:
        th = self.thresholds
        acc = self._accuracy(counts, attr, value)
        classes = {}
        for r in rows:
            if r.attribute == attr and r.value == value:
                d = r.as_dict()
                d["recall_gap"] = (None if r.recall.value is None or r.overall_recall is None
                                   else r.recall.value - r.overall_recall)
                classes[r.class_name] = d
        recalls = [d["recall"]["value"] for d in classes.values() if d["recall"]["value"] is not None]
        gap = None if acc["value"] is None or overall_acc["value"] is None else acc["value"] - overall_acc["value"]
        flagged = bool(attr != ALL and gap is not None and gap < -th.recall_margin and acc["n"] >= th.min_samples)
        return {"n": acc["n"], "accuracy": acc, "accuracy_gap": gap, "flagged": flagged,
                "macro_recall": float(np.mean(recalls)) if recalls else None, "classes": classes}

    @staticmethod
    def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """``after - before`` of accuracy, macro recall and per-class recall/precision for every subgroup."""

        def diff(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        out: dict[str, Any] = {}
        for attr, groups in before["attributes"].items():
            out[attr] = {}
            for value, g in groups.items():
                h = after["attributes"][attr].get(value)
                if h is None:
                    continue
                out[attr][value] = {
                    "accuracy": diff(g["accuracy"]["value"], h["accuracy"]["value"]),
                    "macro_recall": diff(g["macro_recall"], h["macro_recall"]),
                    "recall": {c: diff(r["recall"]["value"], h["classes"][c]["recall"]["value"])
                               for c, r in g["classes"].items()},
                    "precision": {c: diff(r["precision"]["value"], h["classes"][c]["precision"]["value"])
                                  for c, r in g["classes"].items()},
                }
        return out


def recall_by_group(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                    classes: list[str]) -> dict[str, dict[str, float]]:
    """``{group value: {class name: recall}}``; classes absent from a group are left out (manifest baselines)."""
    _, by_group = subgroup_counts(y_true, y_pred, groups, len(classes))
    out: dict[str, dict[str, float]] = {}
    for value, counts in by_group.items():
        out[value] = {name: counts[c, 0] / (counts[c, 0] + counts[c, 1])
                      for c, name in enumerate(classes) if counts[c, 0] + counts[c, 1] > 0}
        out[value] = {k: float(v) for k, v in out[value].items()}
    return out
