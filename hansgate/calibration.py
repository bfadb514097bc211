"""Temperature scaling (Guo et al. 2017), expected calibration error and reliability bins (torch-free, L1).

Refinement fits ``T`` on held-out labelled data and the manifest records it; the gateway
estimates recall before labels arrive from ``softmax(logits / T)``; the audit draws the
bundle's reliability diagram. ECE uses equal-width confidence bins. By default ``T`` minimises the negative
log-likelihood (Guo et al. 2017, Sec. 4.2); the NLL is convex in ``beta = 1 / T`` (a log-sum-exp of
functions linear in ``beta`` minus a linear term), so a bounded scalar search finds the global optimum.

``objective="brier"`` minimises the Brier score ``mean_n sum_k (p_k(x_n) - [y_n = k])^2`` instead, a
proper scoring rule over the whole probability vector. The label-free recall estimate sums every
class's probability over rows (expected true positives and false negatives), so it needs the
probabilities of the classes a row is *not* predicted as to be right too; the NLL looks only at the
true class's probability and is unbounded on confident mistakes, so a few shortcut failures in the
calibration data can set the temperature for all the rest. The Brier score is bounded per sample.
It need not be convex in ``beta``: the bounded search runs from a grid's best point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from hansgate.errors import DataError

__all__ = ["Calibration", "fit_temperature", "expected_calibration_error", "calibrated_probabilities",
           "ReliabilityBin", "reliability_bins"]

#: ``beta = 1 / T`` is searched in this interval (T from 0.01 to 100)
BETA_BOUNDS = (1e-2, 1e2)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature with its evidence: ECE (``bins`` equal-width bins) before and after, on ``n`` samples."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int
    bins: int


def _nll(logits: np.ndarray, y: np.ndarray, beta: float) -> float:
    return float(-log_softmax(logits * beta, axis=1)[np.arange(len(y)), y].mean())


def _brier(logits: np.ndarray, y: np.ndarray, beta: float) -> float:
    p = np.exp(log_softmax(logits * beta, axis=1))
    p[np.arange(len(y)), y] -= 1.0
    return float((p * p).sum(axis=1).mean())


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / T)`` ``[N, K]``, computed stably in float64."""
    return np.exp(log_softmax(np.asarray(logits, np.float64) / temperature, axis=1))


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin ``[low, high)``: its sample count, mean confidence and accuracy."""

    low: float
    high: float
    count: int
    confidence: float | None
    accuracy: float | None


def reliability_bins(probabilities: np.ndarray, y: np.ndarray, bins: int = 15) -> list[ReliabilityBin]:
    """The reliability diagram's bins of the top-class confidence (``None`` figures for empty bins)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        in_bin = index == b
        n = int(in_bin.sum())
        out.append(ReliabilityBin(b / bins, (b + 1) / bins, n, float(confidence[in_bin].mean()) if n else None,
                                  float(correct[in_bin].mean()) if n else None))
    return out


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` over equal-width confidence bins."""
    n = len(y)
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in reliability_bins(probabilities, y, bins)
                     if b.accuracy is not None and b.confidence is not None))


def fit_temperature(logits: np.ndarray, y: np.ndarray, bins: int = 15,
                    objective: Literal["nll", "brier"] = "nll") -> Calibration:
    """The temperature minimising ``objective`` (module doc) for ``logits [N, K]`` and labels ``y [N]``
    (held-out data), fitted in float64."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) < 2:
        raise DataError(f"temperature scaling needs logits [N, K] and N >= 2 labels, got {logits.shape} and {y.shape}")
    if not np.isfinite(logits).all():
        raise DataError("temperature scaling got non-finite logits")
    if y.min() < 0 or y.max() >= logits.shape[1]:
        raise DataError(f"labels must lie in [0, {logits.shape[1]}), got {y.min()}..{y.max()}")
    if objective == "nll":
        result = minimize_scalar(lambda beta: _nll(logits, y, beta), bounds=BETA_BOUNDS, method="bounded",
                                 options={"xatol": 1e-6})
        beta = float(result.x)
    elif objective == "brier":
        # log-spaced grid over the bounds, then a bounded search between the best point's neighbours
        grid = np.geomspace(*BETA_BOUNDS, 81)
        i = int(np.argmin([_brier(logits, y, b) for b in grid]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        result = minimize_scalar(lambda b: _brier(logits, y, b), bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-9})
        beta = float(result.x)
    else:
        raise DataError(f"objective must be 'nll' or 'brier', got {objective!r}")
    temperature = 1.0 / beta
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(calibrated_probabilities(logits), y, bins),
        ece_after=expected_calibration_error(calibrated_probabilities(logits, temperature), y, bins),
        nll_before=_nll(logits, y, 1.0),
        nll_after=_nll(logits, y, 1.0 / temperature),
        n=len(y),
        bins=bins,
    )
