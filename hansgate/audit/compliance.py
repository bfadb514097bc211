"""Compliance figures from counts: subgroup recall/precision with Wilson intervals, TCAV from sign counts.

Torch-free on purpose: the online gateway (``service``) computes its compliance snapshot
from its Prometheus counters with these functions, and the offline audit report computes
the same figures from confusion counts on a labelled data set, so both agree by
construction (issue 5).

The inputs are plain counts:

* per class ``c`` and subgroup ``(attribute, value)``, the one-vs-rest confusion counts
  ``tp`` (true ``c``, predicted ``c``), ``fn`` (true ``c``, predicted other), ``fp`` (true
  other, predicted ``c``) and ``tn``;
* per concept and class, the number of samples whose directional derivative of the class
  logit along the CAV was positive, and the number of samples counted (TCAV, Kim et al.
  2018, Eq. 2: ``TCAV_{C,k} = |{x : S_{C,k}(x) > 0}| / |X_k|``).

Intervals are Wilson score intervals (Wilson 1927; Brown, Cai & DasGupta 2001, Eq. 4):
``(p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, which stay inside [0, 1] and
behave at 0 and n successes, unlike the normal approximation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

__all__ = [
    "ALL",
    "Outcomes",
    "Rate",
    "wilson_interval",
    "rate",
    "outcomes_from_labels",
    "SubgroupRow",
    "TcavRow",
    "subgroup_table",
    "tcav_table",
    "ComplianceThresholds",
]

#: The attribute/value used for "every sample" (overall recall) in counters and tables.
ALL = "_all"


@dataclass(frozen=True)
class Outcomes:
    """One-vs-rest confusion counts of one class in one group."""

    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0

    def __add__(self, other: "Outcomes") -> "Outcomes":
        return Outcomes(self.tp + other.tp, self.fn + other.fn, self.fp + other.fp, self.tn + other.tn)

    @property
    def positives(self) -> int:
        """Samples whose true label is the class (the recall denominator)."""
        return self.tp + self.fn

    @property
    def predicted(self) -> int:
        """Samples predicted as the class (the precision denominator)."""
        return self.tp + self.fp


@dataclass(frozen=True)
class Rate:
    """A proportion ``k / n`` with its Wilson interval; ``value`` is ``None`` when ``n == 0``."""

    k: int
    n: int
    value: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (``n > 0``, ``0 <= k <= n``).

    ``z`` is the normal quantile (1.96 for a 95 % interval).
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact ends: the interval contains 0 at k == 0 and 1 at k == n (rounding aside)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def rate(k: int, n: int, z: float = 1.96) -> Rate:
    """``k / n`` with its Wilson interval (all ``None`` when ``n == 0``)."""
    if n == 0:
        return Rate(k, n, None, None, None)
    low, high = wilson_interval(k, n, z)
    return Rate(k, n, k / n, low, high)


def outcomes_from_labels(true: int, predicted: int, n_classes: int) -> list[Outcomes]:
    """The one-vs-rest outcome of one labelled prediction for every class ``0..n_classes-1``."""
    out = []
    for c in range(n_classes):
        if c == true:
            out.append(Outcomes(tp=1) if predicted == true else Outcomes(fn=1))
        elif c == predicted:
            out.append(Outcomes(fp=1))
        else:
            out.append(Outcomes(tn=1))
    return out


@dataclass(frozen=True)
class ComplianceThresholds:
    """When a figure is flagged.

    ``recall_margin``: a subgroup's recall more than this below the class's overall recall.
    ``tcav_margin``: a TCAV score more than this away from its deployment baseline.
    ``min_samples``: no flag from fewer samples than this (recall: positives; TCAV: samples).
    ``z``: normal quantile of the reported intervals.
    """

    recall_margin: float = 0.1
    tcav_margin: float = 0.15
    min_samples: int = 30
    z: float = 1.96


@dataclass(frozen=True)
class SubgroupRow:
    """Recall and precision of one class in one subgroup, against the class's overall recall."""

    attribute: str
    value: str
    class_name: str
    outcomes: Outcomes
    recall: Rate
    precision: Rate
    overall_recall: float | None
    baseline_recall: float | None
    flags: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {"attribute": self.attribute, "value": self.value, "class": self.class_name,
                "outcomes": asdict(self.outcomes), "recall": self.recall.as_dict(),
                "precision": self.precision.as_dict(), "overall_recall": self.overall_recall,
                "baseline_recall": self.baseline_recall, "flags": list(self.flags)}


@dataclass(frozen=True)
class TcavRow:
    """TCAV score of one concept for one class now, against its deployment baseline."""

    concept: str
    class_name: str
    score: Rate
    baseline: float | None
    flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def drift(self) -> float | None:
        if self.score.value is None or self.baseline is None:
            return None
        return self.score.value - self.baseline

    def as_dict(self) -> dict:
        return {"concept": self.concept, "class": self.class_name, "score": self.score.as_dict(),
                "baseline": self.baseline, "drift": self.drift, "flags": list(self.flags)}


def subgroup_table(
    counts: Mapping[tuple[str, str, str], Outcomes],
    classes: Iterable[str],
    baseline_recall: Mapping[tuple[str, str], Mapping[str, float]] | None = None,
    thresholds: ComplianceThresholds = ComplianceThresholds(),
) -> list[SubgroupRow]:
    """Rows for every ``(attribute, value, class)`` in ``counts``, overall rows (``ALL``) first.

    ``counts[(attribute, value, class)]`` are the class's one-vs-rest outcomes within the
    subgroup; the overall figures are ``counts[(ALL, ALL, class)]``. A subgroup row is
    flagged ``recall_below_overall`` when its recall is more than ``recall_margin`` below the
    overall recall and it has at least ``min_samples`` positives; ``recall_below_baseline``
    likewise against the manifest's baseline recall (``baseline_recall[(attribute, value)][class]``).
    """
    baseline_recall = baseline_recall or {}
    classes = list(classes)
    overall = {c: rate(counts[(ALL, ALL, c)].tp, counts[(ALL, ALL, c)].positives, thresholds.z)
               for c in classes if (ALL, ALL, c) in counts}
    rows = []

    def order(key: tuple[str, str, str]) -> tuple[int, str, str, int]:
        a, v, c = key
        return (0 if a == ALL else 1, a, v, classes.index(c) if c in classes else len(classes))

    for key in sorted(counts, key=order):
        attribute, value, cls = key
        o = counts[key]
        rec = rate(o.tp, o.positives, thresholds.z)
        prec = rate(o.tp, o.predicted, thresholds.z)
        ov = overall.get(cls)
        base = baseline_recall.get((attribute, value), {}).get(cls)
        flags = []
        if attribute != ALL and rec.value is not None and o.positives >= thresholds.min_samples:
            if ov is not None and ov.value is not None and rec.value < ov.value - thresholds.recall_margin:
                flags.append("recall_below_overall")
            if base is not None and rec.value < base - thresholds.recall_margin:
                flags.append("recall_below_baseline")
        rows.append(SubgroupRow(attribute, value, cls, o, rec, prec, None if ov is None else ov.value, base,
                                tuple(flags)))
    return rows


def tcav_table(
    positive: Mapping[tuple[str, str], int],
    samples: Mapping[tuple[str, str], int],
    baseline: Mapping[tuple[str, str], float] | None = None,
    thresholds: ComplianceThresholds = ComplianceThresholds(),
) -> list[TcavRow]:
    """TCAV rows for every ``(concept, class)`` with samples or a baseline.

    ``positive[(concept, class)]`` counts samples with a positive directional derivative,
    ``samples[(concept, class)]`` the samples counted. A row is flagged ``tcav_drift`` when
    ``|score - baseline| > tcav_margin`` from at least ``min_samples`` samples.
    """
    baseline = baseline or {}
    keys = sorted(set(samples) | set(baseline))
    rows = []
    for key in keys:
        n = int(samples.get(key, 0))
        k = int(positive.get(key, 0))
        if k > n:
            raise ValueError(f"{key}: {k} positive of {n} samples")
        score = rate(k, n, thresholds.z)
        base = baseline.get(key)
        flags = []
        if score.value is not None and base is not None and n >= thresholds.min_samples \
                and abs(score.value - base) > thresholds.tcav_margin:
            flags.append("tcav_drift")
        rows.append(TcavRow(key[0], key[1], score, base, tuple(flags)))
    return rows
