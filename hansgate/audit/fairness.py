"""Demographic parity and equalized odds per attribute, one-vs-rest per class, with Wilson intervals.

For a class ``c`` a sample is *selected* when the model predicts ``c``. Per attribute value
``g`` (fairlearn's ``MetricFrame`` does the grouping and the rates):

- **selection rate** ``P(pred = c | g)`` (demographic parity, Hardt et al. 2016, Eq. 1 asks it be
  equal across groups) and its ratio to the highest rate among the attribute's values: the
  disparate-impact ratio of the US four-fifths rule (29 CFR 1607.4(D)), flagged
  ``four_fifths`` below ``bound`` (0.8) when this group and the highest group each have at least
  ``min_samples`` samples;
- **true- and false-positive rates** ``P(pred = c | y = c, g)`` and ``P(pred = c | y != c, g)``
  (equalized odds, Hardt et al. 2016, Eq. 2 asks both be equal across groups); per attribute and
  class the largest gap of each among the groups where the rate is defined, flagged when one exceeds
  ``margin`` among groups with at least ``min_samples`` positives (TPR) or negatives (FPR).

The attribute-level summaries are fairlearn's ``demographic_parity_ratio`` and
``demographic_parity_difference``; the gaps are computed here because fairlearn's
``equalized_odds_difference`` counts a group without positives as a TPR of 0.
Intervals are Wilson score intervals (``audit.compliance.rate``). Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    demographic_parity_ratio,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)

from hansgate.audit.compliance import rate

__all__ = ["SelectionRow", "ParityRow", "OddsRow", "OddsGapRow", "ModelFairness", "FairnessSection",
           "model_fairness", "fairness_section"]


@dataclass(frozen=True)
class SelectionRow:
    """How often subgroup ``value`` of ``attribute`` is predicted ``class_name``, with its interval."""

    attribute: str
    value: str
    class_name: str
    predicted: int
    total: int
    rate: float
    low: float
    high: float
    ratio_to_max: float | None
    flags: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["class"] = d.pop("class_name")
        d["flags"] = list(self.flags)
        return {k: d[k] for k in ("attribute", "value", "class", "predicted", "total", "rate", "low", "high",
                                  "ratio_to_max", "flags")}


@dataclass(frozen=True)
class ParityRow:
    """fairlearn's demographic parity ratio (lowest / highest selection rate) and difference for one class."""

    attribute: str
    class_name: str
    min_rate: float
    max_rate: float
    ratio: float | None
    difference: float
    flagged: bool

    def as_dict(self) -> dict[str, object]:
        return {"attribute": self.attribute, "class": self.class_name, "min_rate": self.min_rate,
                "max_rate": self.max_rate, "ratio": self.ratio, "difference": self.difference,
                "flagged": self.flagged}


@dataclass(frozen=True)
class OddsRow:
    """True- and false-positive rate of ``class_name`` in one subgroup (``None`` without positives/negatives)."""

    attribute: str
    value: str
    class_name: str
    positives: int
    tpr: float | None
    tpr_low: float | None
    tpr_high: float | None
    negatives: int
    fpr: float | None
    fpr_low: float | None
    fpr_high: float | None

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["class"] = d.pop("class_name")
        return d


@dataclass(frozen=True)
class OddsGapRow:
    """The largest TPR and FPR gaps between an attribute's values for one class."""

    attribute: str
    class_name: str
    tpr_gap: float | None
    fpr_gap: float | None
    flagged: bool

    @property
    def gap(self) -> float | None:
        gaps = [g for g in (self.tpr_gap, self.fpr_gap) if g is not None]
        return max(gaps) if gaps else None

    def as_dict(self) -> dict[str, object]:
        return {"attribute": self.attribute, "class": self.class_name, "tpr_gap": self.tpr_gap,
                "fpr_gap": self.fpr_gap, "gap": self.gap, "flagged": self.flagged}


@dataclass(frozen=True)
class ModelFairness:
    selection: list[SelectionRow]
    parity: list[ParityRow]
    odds: list[OddsRow]
    odds_gaps: list[OddsGapRow]

    def as_dict(self) -> dict[str, object]:
        return {"selection": [r.as_dict() for r in self.selection], "parity": [r.as_dict() for r in self.parity],
                "odds": [r.as_dict() for r in self.odds], "odds_gaps": [r.as_dict() for r in self.odds_gaps]}


@dataclass(frozen=True)
class FairnessSection:
    """Per model role, the fairness tables; the rules they were flagged by."""

    bound: float
    margin: float
    min_samples: int
    z: float
    models: dict[str, ModelFairness]

    def as_dict(self) -> dict[str, object]:
        return {"status": "done", "bound": self.bound, "odds_margin": self.margin, "min_samples": self.min_samples,
                "z": self.z, "models": {m: f.as_dict() for m, f in self.models.items()}}


def _spread(values: dict[str, float | None], guard: dict[str, bool] | None = None) -> float | None:
    vals = [v for g, v in values.items() if v is not None and (guard is None or guard[g])]
    return max(vals) - min(vals) if len(vals) >= 2 else None


def model_fairness(y_true: np.ndarray, y_pred: np.ndarray, attributes: Mapping[str, np.ndarray],
                   classes: list[str], bound: float = 0.8, margin: float = 0.1, min_samples: int = 30,
                   z: float = 1.96) -> ModelFairness:
    """The fairness tables of one model's predictions ``y_pred`` against labels ``y_true``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    selection, parity, odds, gaps = [], [], [], []
    for attr, raw in attributes.items():
        groups = np.asarray(raw).astype(str)
        for c, cls in enumerate(classes):
            t, p = (y_true == c).astype(int), (y_pred == c).astype(int)
            frame = MetricFrame(
                metrics={"selection": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate,
                         "n": count},
                y_true=t, y_pred=p, sensitive_features={attr: groups})
            by = frame.by_group
            values = [str(v) for v in by.index]
            sel = {v: float(by.loc[v, "selection"]) for v in values}
            total = {v: int(by.loc[v, "n"]) for v in values}
            top = max(values, key=lambda v: sel[v])
            max_rate = sel[top]
            for v in values:
                in_group = groups == v
                predicted, positives = int(p[in_group].sum()), int(t[in_group].sum())
                r = rate(predicted, total[v], z)
                ratio = sel[v] / max_rate if max_rate > 0 else None
                guarded = total[v] >= min_samples and total[top] >= min_samples
                flags = ("four_fifths",) if ratio is not None and ratio < bound and guarded else ()
                selection.append(SelectionRow(attr, v, cls, predicted, total[v], sel[v], float(r.low or 0.0),
                                              float(r.high or 0.0), ratio, flags))
                negatives = total[v] - positives
                tp = int((t[in_group] & p[in_group]).sum())
                tr, fr = rate(tp, positives, z), rate(predicted - tp, negatives, z)
                odds.append(OddsRow(attr, v, cls, positives, float(by.loc[v, "tpr"]) if positives else None, tr.low,
                                    tr.high, negatives, float(by.loc[v, "fpr"]) if negatives else None, fr.low,
                                    fr.high))
            ratio_all = float(demographic_parity_ratio(t, p, sensitive_features=groups)) if max_rate > 0 else None
            parity.append(ParityRow(attr, cls, min(sel.values()), max_rate, ratio_all,
                                    float(demographic_parity_difference(t, p, sensitive_features=groups)),
                                    any("four_fifths" in row.flags for row in selection[-len(values):])))
            rows = odds[-len(values):]
            tpr = {r.value: r.tpr for r in rows}
            fpr = {r.value: r.fpr for r in rows}
            g_tpr = _spread(tpr, {r.value: r.positives >= min_samples for r in rows})
            g_fpr = _spread(fpr, {r.value: r.negatives >= min_samples for r in rows})
            flagged = any(g is not None and g > margin for g in (g_tpr, g_fpr))
            gaps.append(OddsGapRow(attr, cls, _spread(tpr), _spread(fpr), flagged))
    return ModelFairness(selection, parity, odds, gaps)


def fairness_section(y_true: np.ndarray, predicted: Mapping[str, np.ndarray], attributes: Mapping[str, np.ndarray],
                     classes: list[str], bound: float = 0.8, margin: float = 0.1, min_samples: int = 30,
                     z: float = 1.96) -> FairnessSection:
    """``model_fairness`` of every model role's predictions on the same labelled data."""
    return FairnessSection(bound, margin, min_samples, z,
                           {m: model_fairness(y_true, p, attributes, classes, bound, margin, min_samples, z)
                            for m, p in predicted.items()})
