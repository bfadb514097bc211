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

The attribute-level summaries follow fairlearn's ``demographic_parity_ratio`` and
``demographic_parity_difference`` (lowest over highest, highest minus lowest group rate; the tests
check they agree); the gaps are computed here because fairlearn's ``equalized_odds_difference``
counts a group without positives as a TPR of 0.
Intervals are Wilson score intervals (``audit.compliance.rate``). Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    count,
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


def _one_vs_rest(metric: Callable[..., float], c: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """fairlearn's binary ``metric`` for class ``c`` against the rest, on multi-class labels."""

    def fn(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return float(metric((np.asarray(y_true) == c).astype(int), (np.asarray(y_pred) == c).astype(int)))

    return fn


def model_fairness(y_true: np.ndarray, y_pred: np.ndarray, attributes: Mapping[str, np.ndarray],
                   classes: list[str], bound: float = 0.8, margin: float = 0.1, min_samples: int = 30,
                   z: float = 1.96) -> ModelFairness:
    """The fairness tables of one model's predictions ``y_pred`` against labels ``y_true``.

    One ``MetricFrame`` per attribute computes every class's selection rate, TPR and FPR (fairlearn's
    metrics, one class against the rest); the counts behind them (for the intervals) are counted here,
    and the parity ratio and difference are fairlearn's definitions over those rates.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float | int]] = {"n": count}
    for c in range(len(classes)):
        metrics |= {f"selection_{c}": _one_vs_rest(selection_rate, c), f"tpr_{c}": _one_vs_rest(true_positive_rate, c),
                    f"fpr_{c}": _one_vs_rest(false_positive_rate, c)}
    selection, parity, odds, gaps = [], [], [], []
    for attr, raw in attributes.items():
        groups = np.asarray(raw).astype(str)
        by = MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred, sensitive_features={attr: groups}).by_group
        values = [str(v) for v in by.index]
        total = {v: int(by.loc[v, "n"]) for v in values}
        for c, cls in enumerate(classes):
            sel = {v: float(by.loc[v, f"selection_{c}"]) for v in values}
            top = max(values, key=lambda v: sel[v])
            max_rate = sel[top]
            rows_sel, rows_odds = [], []
            for v in values:
                t, q = y_true[groups == v] == c, y_pred[groups == v] == c
                predicted, positives, tp = int(q.sum()), int(t.sum()), int((t & q).sum())
                negatives = total[v] - positives
                r = rate(predicted, total[v], z)
                ratio = sel[v] / max_rate if max_rate > 0 else None
                guarded = total[v] >= min_samples and total[top] >= min_samples
                flags = ("four_fifths",) if ratio is not None and ratio < bound and guarded else ()
                rows_sel.append(SelectionRow(attr, v, cls, predicted, total[v], sel[v], float(r.low or 0.0),
                                             float(r.high or 0.0), ratio, flags))
                tr, fr = rate(tp, positives, z), rate(predicted - tp, negatives, z)
                rows_odds.append(OddsRow(attr, v, cls, positives, float(by.loc[v, f"tpr_{c}"]) if positives else None,
                                         tr.low, tr.high, negatives,
                                         float(by.loc[v, f"fpr_{c}"]) if negatives else None, fr.low, fr.high))
            low_rate = min(sel.values())
            parity.append(ParityRow(attr, cls, low_rate, max_rate, low_rate / max_rate if max_rate > 0 else None,
                                    max_rate - low_rate, any(row.flags for row in rows_sel)))
            tpr = {r.value: r.tpr for r in rows_odds}
            fpr = {r.value: r.fpr for r in rows_odds}
            g_tpr = _spread(tpr, {r.value: r.positives >= min_samples for r in rows_odds})
            g_fpr = _spread(fpr, {r.value: r.negatives >= min_samples for r in rows_odds})
            flagged = any(g is not None and g > margin for g in (g_tpr, g_fpr))
            gaps.append(OddsGapRow(attr, cls, _spread(tpr), _spread(fpr), flagged))
            selection += rows_sel
            odds += rows_odds
    return ModelFairness(selection, parity, odds, gaps)


def fairness_section(y_true: np.ndarray, predicted: Mapping[str, np.ndarray], attributes: Mapping[str, np.ndarray],
                     classes: list[str], bound: float = 0.8, margin: float = 0.1, min_samples: int = 30,
                     z: float = 1.96) -> FairnessSection:
    """``model_fairness`` of every model role's predictions on the same labelled data."""
    return FairnessSection(bound, margin, min_samples, z,
                           {m: model_fairness(y_true, p, attributes, classes, bound, margin, min_samples, z)
                            for m, p in predicted.items()})
