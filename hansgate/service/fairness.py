"""Live fairness before labels arrive: subgroup attributes at prediction time, selection counts,
the four-fifths rule, and calibrated label-free recall per subgroup.

- **Attributes** come with a prediction (JSON ``attributes``: one object for every row or a
  list with one per row; header ``X-Hansgate-Attributes: site=B,stroke=thin`` for raw
  bodies). Only attributes and values the manifest declares pass; they are counted, never
  stored beside the image.
- **Selection** (demographic parity): ``predicted[a, v, k]`` rows of subgroup ``a = v``
  predicted ``k`` out of ``total[a, v]``; the selection rate's ratio to the highest rate among
  the attribute's values for that class is the disparate-impact ratio (US four-fifths rule:
  flagged below 0.8), guarded by a minimum sample count on every subgroup involved.
- **Label-free recall** (confidence-based estimation): with calibrated probabilities
  ``p = softmax(logits / T)`` (``T`` fitted at refine time), or ``p = softmax(s * logits + b)``
  with one scale and bias per class (vector scaling, ``Calibrator``), a row predicted ``k`` adds
  ``p_k`` to the expected true positives of ``k`` and a row predicted otherwise adds
  ``p_k`` to the expected false negatives of ``k``; ``tp_hat / (tp_hat + fn_hat)`` estimates
  recall. It assumes calibration holds on the deployed data; where a watched concept
  (a known shortcut) is present in more than ``presence_bound`` of a subgroup's rows, the
  data left the distribution the calibration was fitted on, and the estimate is marked
  untrusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence, TypedDict

import numpy as np

from hansgate.errors import BundleError, RequestError
from hansgate.manifest import CalibrationSpec

__all__ = [
    "Calibrator",
    "ATTRIBUTE_HEADER",
    "Declared",
    "check_attributes",
    "parse_attribute_header",
    "row_attributes",
    "FairnessCounts",
    "fairness_counts",
    "FairnessThresholds",
    "SelectionEntry",
    "EstimatedEntry",
    "selection_table",
    "estimated_table",
]

#: the request header that carries subgroup attributes for raw image and .npy bodies
ATTRIBUTE_HEADER = "X-Hansgate-Attributes"
#: longest header value read (every declared attribute with its longest value fits far below)
MAX_HEADER_CHARS = 4096

Declared = Mapping[str, Sequence[str]]


def check_attributes(pairs: Mapping[str, object], declared: Declared) -> dict[str, str]:
    """``pairs`` when every name and value is declared; ``RequestError`` (unknown_attribute/value) otherwise."""
    out: dict[str, str] = {}
    for name, value in pairs.items():
        if name not in declared:
            raise RequestError(f"attribute {str(name)[:64]!r} is not declared by the bundle "
                               f"(declared: {', '.join(sorted(declared)) or 'none'})", reason="unknown_attribute")
        if not isinstance(value, str) or value not in declared[name]:
            raise RequestError(f"value {str(value)[:64]!r} is not declared for attribute {name!r} "
                               f"(declared: {', '.join(declared[name])})", reason="unknown_value")
        out[name] = value
    return out


def parse_attribute_header(header: str, declared: Declared) -> dict[str, str]:
    """``"site=B,stroke=thin"`` -> ``{"site": "B", "stroke": "thin"}``, declared names and values only."""
    if len(header) > MAX_HEADER_CHARS:
        raise RequestError(f"{ATTRIBUTE_HEADER} is longer than {MAX_HEADER_CHARS} characters", reason="bad_request")
    pairs: dict[str, str] = {}
    for item in header.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise RequestError(f"{ATTRIBUTE_HEADER} items are name=value, got {item.strip()[:64]!r}",
                               reason="bad_request")
        if name.strip() in pairs:
            raise RequestError(f"{ATTRIBUTE_HEADER} names {name.strip()!r} twice", reason="bad_request")
        pairs[name.strip()] = value.strip()
    return check_attributes(pairs, declared)


def row_attributes(attributes: Mapping[str, object] | Sequence[Mapping[str, object]] | None, n_rows: int,
                   declared: Declared) -> list[dict[str, str]]:
    """One attribute dict per row: the same object for every row, or a list with one object per row."""
    if attributes is None:
        return [{} for _ in range(n_rows)]
    if isinstance(attributes, Mapping):
        one = check_attributes(attributes, declared)
        return [one for _ in range(n_rows)]
    if len(attributes) != n_rows:
        # 400 like an undecodable body: the schema cannot tie the list's length to the tensor's
        raise RequestError(f"attributes: {len(attributes)} objects for {n_rows} rows; send one per row or one "
                           "object for all", reason="bad_request")
    return [check_attributes(a, declared) for a in attributes]


class Calibrator:
    """The manifest's calibration as one affine map of the logits: ``softmax(scales * logits + biases)``.

    Temperature scaling is ``scales = 1 / T``, ``biases = 0``; vector scaling (schema 1.3) reads
    them per class. The manifest validated them already; they are checked again here (one
    scale and one bias per class, finite) because a wrong length would broadcast silently.
    The same map as ``calibration.calibrated_probabilities``, in numpy: that module imports
    scipy, which the gateway otherwise never loads and every worker would pay for at start.
    """

    def __init__(self, spec: CalibrationSpec, n_classes: int) -> None:
        if spec.family == "vector":
            scales = np.asarray(spec.scales if spec.scales is not None else [], np.float64)
            biases = np.asarray(spec.biases if spec.biases is not None else [], np.float64)
        else:
            scales, biases = np.full(n_classes, 1.0 / spec.temperature), np.zeros(n_classes)
        if scales.shape != (n_classes,) or biases.shape != (n_classes,):
            raise BundleError(f"calibration has {scales.size} scales and {biases.size} biases for {n_classes} classes")
        if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
            raise BundleError("calibration scales and biases must be finite")
        self.family = spec.family
        self.scales, self.biases = scales, biases

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``[N, K]`` of ``logits [N, K]``, in float64."""
        z = logits.astype(np.float64) * self.scales + self.biases
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))


@dataclass
class FairnessCounts:
    """What one batch adds, keyed by ``(attribute, value)`` then class or concept name."""

    predicted: dict[tuple[str, str, str], int] = field(default_factory=dict)
    expected_tp: dict[tuple[str, str, str], float] = field(default_factory=dict)
    expected_fn: dict[tuple[str, str, str], float] = field(default_factory=dict)
    present: dict[tuple[str, str, str], int] = field(default_factory=dict)
    rows: dict[tuple[str, str], int] = field(default_factory=dict)


def fairness_counts(predicted: np.ndarray, probabilities: np.ndarray | None, present: np.ndarray | None,
                    attributes: list[dict[str, str]], classes: Sequence[str],
                    concepts: Sequence[str]) -> FairnessCounts:
    """Per subgroup: selection counts, expected tp/fn from calibrated ``probabilities [N, K]``, concept presence.

    ``predicted [N]`` class indices; ``present [N, M]`` booleans (``None`` without concepts).
    Rows without attributes add nothing here (they are counted by the overall counters).
    """
    out = FairnessCounts()
    groups: dict[tuple[str, str], list[int]] = {}
    for i, attrs in enumerate(attributes):
        for name, value in attrs.items():
            groups.setdefault((name, value), []).append(i)
    for (name, value), index in groups.items():
        rows = np.asarray(index)
        out.rows[(name, value)] = len(rows)
        pred = predicted[rows]
        for k, cls in enumerate(classes):
            hits = int((pred == k).sum())
            if hits:
                out.predicted[(name, value, cls)] = hits
            if probabilities is not None:
                p = probabilities[rows, k]
                out.expected_tp[(name, value, cls)] = float(p[pred == k].sum())
                out.expected_fn[(name, value, cls)] = float(p[pred != k].sum())
        if present is not None:
            for m, concept in enumerate(concepts):
                out.present[(name, value, concept)] = int(present[rows, m].sum())
    return out


SelectionEntry = TypedDict("SelectionEntry", {
    "attribute": str, "value": str, "class": str, "predicted": int, "total": int, "rate": float | None,
    "ratio_to_max": float | None, "flags": list[str]})
EstimatedEntry = TypedDict("EstimatedEntry", {
    "attribute": str, "value": str, "class": str, "estimated_recall": float | None,
    "realized_recall": float | None, "labelled": int, "trusted": bool})


@dataclass(frozen=True)
class FairnessThresholds:
    """``ratio_bound``: disparate-impact flag below this (four-fifths rule); ``min_samples``: no flag, and no
    trusted estimate, from fewer rows than this; ``presence_bound``: share of a subgroup's rows carrying a
    watched concept above which its label-free estimate is untrusted."""

    ratio_bound: float = 0.8
    min_samples: int = 30
    presence_bound: float = 0.05


def _ratio(k: float, n: float) -> float | None:
    return k / n if n > 0 else None


def selection_table(predicted: Mapping[tuple[str, str, str], int], rows: Mapping[tuple[str, str], int],
                    declared: Declared, classes: Sequence[str],
                    thresholds: FairnessThresholds = FairnessThresholds()) -> list[SelectionEntry]:
    """The ``selection`` list of ``/compliance``: one entry per attribute, value and class.

    ``ratio_to_max`` is this subgroup's selection rate over the highest rate among the attribute's
    values for the class (``None`` while no value has rows or no row was predicted the class).
    ``flags``: ``adverse_impact`` when the ratio is below ``ratio_bound`` and every value of the
    attribute has at least ``min_samples`` rows; ``few_samples`` when this subgroup has fewer.
    """
    entries: list[SelectionEntry] = []
    for name, values in declared.items():
        guarded = all(rows.get((name, v), 0) >= thresholds.min_samples for v in values)
        for cls in classes:
            rates = {v: _ratio(predicted.get((name, v, cls), 0), rows.get((name, v), 0)) for v in values}
            top = max((r for r in rates.values() if r is not None), default=None)
            for v in values:
                r = rates[v]
                ratio = r / top if r is not None and top else None
                flags = []
                if rows.get((name, v), 0) < thresholds.min_samples:
                    flags.append("few_samples")
                if guarded and ratio is not None and ratio < thresholds.ratio_bound:
                    flags.append("adverse_impact")
                entries.append({"attribute": name, "value": v, "class": cls,
                                "predicted": predicted.get((name, v, cls), 0), "total": rows.get((name, v), 0),
                                "rate": r, "ratio_to_max": ratio, "flags": flags})
    return entries


def estimated_table(expected_tp: Mapping[tuple[str, str, str], float],
                    expected_fn: Mapping[tuple[str, str, str], float],
                    realized: Mapping[tuple[str, str, str], tuple[int, int]],
                    present: Mapping[tuple[str, str, str], int], rows: Mapping[tuple[str, str], int],
                    declared: Declared, classes: Sequence[str], concepts: Sequence[str], calibrated: bool,
                    thresholds: FairnessThresholds = FairnessThresholds()) -> list[EstimatedEntry]:
    """The ``estimated`` list of ``/compliance``: label-free recall beside realized recall, per subgroup and class.

    ``realized[(a, v, k)] = (tp, tp + fn)`` from feedback. ``trusted`` is false when the bundle carries no
    calibration, when the subgroup has fewer than ``min_samples`` rows, or when a watched concept is present
    in more than ``presence_bound`` of its rows (calibration was fitted on data without it).
    """
    entries: list[EstimatedEntry] = []
    for name, values in declared.items():
        for v in values:
            n = rows.get((name, v), 0)
            shortcut = any(n and present.get((name, v, c), 0) / n > thresholds.presence_bound for c in concepts)
            trusted = calibrated and n >= thresholds.min_samples and not shortcut
            for cls in classes:
                tp_hat = expected_tp.get((name, v, cls), 0.0)
                fn_hat = expected_fn.get((name, v, cls), 0.0)
                tp, positives = realized.get((name, v, cls), (0, 0))
                estimate = _ratio(tp_hat, tp_hat + fn_hat) if calibrated else None
                entries.append({"attribute": name, "value": v, "class": cls,
                                "estimated_recall": None if estimate is None or not math.isfinite(estimate)
                                else estimate,
                                "realized_recall": _ratio(tp, positives), "labelled": positives,
                                "trusted": trusted})
    return entries
