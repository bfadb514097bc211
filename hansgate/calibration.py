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

**Vector scaling** (Guo et al. 2017, Sec. 4.2: a diagonal ``W`` and a bias ``b``) gives every
class its own scale and offset, ``p = softmax(w * z + b)``; with ``w = 1 / T`` everywhere and
``b = 0`` it is temperature scaling. A model whose miscalibration differs by class (a class
whose missed rows keep a low probability of it) needs it: one temperature moves every class
together. Its ``2K`` parameters overfit a small hold-out, so the fit adds the ridge penalty
``lam * (sum_k (w_k - 1/T)^2 + sum_k b_k^2)`` that shrinks towards the fitted temperature
(``lam -> inf`` is temperature scaling); the NLL is convex in ``(w, b)`` (log-sum-exp of linear
functions minus a linear term), so with the penalty the optimum is unique. ``fit_calibration``
chooses ``lam`` -- temperature scaling included, as ``lam = inf`` -- by the cross-validated
objective on the hold-out alone (grouped folds where copies of one source sample must stay
together), so the family is selected by evidence the deployment never supplied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax

from hansgate.errors import DataError
from hansgate.manifest import CalibrationSpec

__all__ = ["Calibration", "fit_temperature", "fit_vector_scaling", "fit_calibration", "expected_calibration_error",
           "calibrated_probabilities", "ReliabilityBin", "reliability_bins", "Objective", "Family", "PENALTIES",
           "CalibrationFit"]

#: ``beta = 1 / T`` is searched in this interval (T from 0.01 to 100)
BETA_BOUNDS = (1e-2, 1e2)
#: the ridge penalties ``lam`` that ``fit_calibration`` compares (module doc), besides temperature scaling
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

Objective = Literal["nll", "brier"]
#: ``auto``: temperature or vector scaling, whichever the cross-validated objective prefers
Family = Literal["temperature", "vector", "auto"]


class CalibrationFit(BaseModel):
    """How refine fits a bundle's calibration: ``fit_calibration``'s family, objective and folds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family = "auto"
    objective: Objective = "nll"
    folds: int = Field(5, ge=2, le=20)


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration with its evidence: ECE (``bins`` equal-width bins) and NLL before and after,
    on ``n`` samples. ``scales``/``biases`` set (vector scaling): ``softmax(scales * z + biases)``; otherwise
    ``softmax(z / temperature)``. ``penalty`` is vector scaling's ridge ``lam``; ``cv_scores`` the
    cross-validated objective of every candidate ``fit_calibration`` compared (``"temperature"``,
    ``"vector@<lam>"``), ``None`` when nothing was compared."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int
    bins: int
    scales: tuple[float, ...] | None = None
    biases: tuple[float, ...] | None = None
    penalty: float | None = None
    objective: str = "nll"
    cv_scores: dict[str, float] | None = None

    @property
    def family(self) -> str:
        """``"vector"`` when per-class scales and biases are set, else ``"temperature"``."""
        return "vector" if self.scales is not None else "temperature"

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated probabilities ``[N, K]`` of ``logits``."""
        return calibrated_probabilities(logits, self.temperature, self.scales, self.biases)

    def as_spec(self) -> CalibrationSpec:
        """What the manifest records (schema 1.3 fields only where they say something)."""
        vector = self.scales is not None
        return CalibrationSpec(temperature=self.temperature, ece_before=self.ece_before, ece_after=self.ece_after,
                               nll_before=self.nll_before, nll_after=self.nll_after, samples=self.n, bins=self.bins,
                               family="vector" if vector else "temperature",
                               scales=list(self.scales) if self.scales is not None else None,
                               biases=list(self.biases) if self.biases is not None else None,
                               penalty=self.penalty if vector else None, objective=self.objective,  # type: ignore[arg-type]
                               cv_scores=self.cv_scores)


def _nll(logits: np.ndarray, y: np.ndarray, beta: float) -> float:
    return float(-log_softmax(logits * beta, axis=1)[np.arange(len(y)), y].mean())


def _brier(logits: np.ndarray, y: np.ndarray, beta: float) -> float:
    return float(_score(np.exp(log_softmax(logits * beta, axis=1)), y, "brier").mean())


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0,
                             scales: Sequence[float] | np.ndarray | None = None,
                             biases: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """``softmax(logits / T)`` ``[N, K]``, or ``softmax(scales * logits + biases)`` when ``scales`` are given
    (vector scaling; ``biases`` default to zero), computed stably in float64."""
    z = np.asarray(logits, np.float64)
    if scales is None:
        return np.exp(log_softmax(z / temperature, axis=1))
    b = np.zeros(z.shape[1]) if biases is None else np.asarray(biases, np.float64)
    return np.exp(log_softmax(z * np.asarray(scales, np.float64) + b, axis=1))


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


def _checked(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) < 2:
        raise DataError(f"calibration needs logits [N, K] and N >= 2 labels, got {logits.shape} and {y.shape}")
    if not np.isfinite(logits).all():
        raise DataError("calibration got non-finite logits")
    if y.min() < 0 or y.max() >= logits.shape[1]:
        raise DataError(f"labels must lie in [0, {logits.shape[1]}), got {y.min()}..{y.max()}")
    return logits, y


def _beta(logits: np.ndarray, y: np.ndarray, objective: str) -> float:
    if objective == "nll":
        return float(minimize_scalar(lambda beta: _nll(logits, y, beta), bounds=BETA_BOUNDS, method="bounded",
                                     options={"xatol": 1e-6}).x)
    if objective == "brier":
        # log-spaced grid over the bounds, then a bounded search between the best point's neighbours
        grid = np.geomspace(*BETA_BOUNDS, 81)
        i = int(np.argmin([_brier(logits, y, b) for b in grid]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        return float(minimize_scalar(lambda b: _brier(logits, y, b), bounds=(lo, hi), method="bounded",
                                     options={"xatol": 1e-9}).x)
    raise DataError(f"objective must be 'nll' or 'brier', got {objective!r}")


def _evidence(logits: np.ndarray, y: np.ndarray, probs: np.ndarray, bins: int, temperature: float,
              **rest: object) -> Calibration:
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-300, None)
    return Calibration(temperature=temperature,
                       ece_before=expected_calibration_error(calibrated_probabilities(logits), y, bins),
                       ece_after=expected_calibration_error(probs, y, bins), nll_before=_nll(logits, y, 1.0),
                       nll_after=float(-np.log(p_true).mean()), n=len(y), bins=bins, **rest)  # type: ignore[arg-type]


def fit_temperature(logits: np.ndarray, y: np.ndarray, bins: int = 15, objective: Objective = "nll") -> Calibration:
    """The temperature minimising ``objective`` (module doc) for ``logits [N, K]`` and labels ``y [N]``
    (held-out data), fitted in float64."""
    logits, y = _checked(logits, y)
    temperature = 1.0 / _beta(logits, y, objective)
    return _evidence(logits, y, calibrated_probabilities(logits, temperature), bins, temperature, objective=objective)


def _vector_loss(params: np.ndarray, z: np.ndarray, y: np.ndarray, objective: str, lam: float,
                 beta0: float) -> tuple[float, np.ndarray]:
    """Mean objective of ``softmax(w * z + b)`` plus the ridge penalty, and its gradient in ``(w, b)``."""
    k = z.shape[1]
    w, b = params[:k], params[k:]
    logp = log_softmax(z * w + b, axis=1)
    p = np.exp(logp)
    rows = np.arange(len(y))
    if objective == "nll":
        value = -logp[rows, y].mean()
        g = p.copy()
        g[rows, y] -= 1.0  # d(-log p_y)/du = p - e_y
    else:
        r = p.copy()
        r[rows, y] -= 1.0
        value = (r * r).sum(axis=1).mean()
        # d sum_k (p_k - e_k)^2 / du_j = 2 p_j (r_j - sum_k r_k p_k)
        g = 2.0 * p * (r - (r * p).sum(axis=1, keepdims=True))
    g /= len(y)
    grad = np.concatenate([(g * z).sum(axis=0) + 2 * lam * (w - beta0), g.sum(axis=0) + 2 * lam * b])
    return float(value + lam * (((w - beta0) ** 2).sum() + (b * b).sum())), grad


def _vector(z: np.ndarray, y: np.ndarray, objective: str, lam: float, beta0: float) -> tuple[np.ndarray, np.ndarray]:
    k = z.shape[1]
    start = np.concatenate([np.full(k, beta0), np.zeros(k)])
    res = minimize(_vector_loss, start, args=(z, y, objective, lam, beta0), jac=True, method="BFGS",
                   options={"maxiter": 2000, "gtol": 1e-9})
    return res.x[:k], res.x[k:]


def fit_vector_scaling(logits: np.ndarray, y: np.ndarray, penalty: float = 1e-2, bins: int = 15,
                       objective: Objective = "nll") -> Calibration:
    """Vector scaling (module doc) with ridge ``penalty`` towards the ``objective``'s fitted temperature."""
    logits, y = _checked(logits, y)
    if not (np.isfinite(penalty) and penalty > 0):
        raise DataError(f"the vector-scaling penalty must be finite and > 0, got {penalty}")
    beta0 = _beta(logits, y, objective)
    w, b = _vector(logits, y, objective, penalty, beta0)
    return _evidence(logits, y, calibrated_probabilities(logits, scales=w, biases=b), bins, 1.0 / beta0,
                     scales=tuple(map(float, w)), biases=tuple(map(float, b)), penalty=float(penalty),
                     objective=objective)


def _score(probs: np.ndarray, y: np.ndarray, objective: str) -> np.ndarray:
    """Per-row objective of ``probs``: ``-log p_y`` or the Brier score."""
    rows = np.arange(len(y))
    if objective == "nll":
        return np.asarray(-np.log(np.clip(probs[rows, y], 1e-300, None)))
    r = probs.copy()
    r[rows, y] -= 1.0
    return np.asarray((r * r).sum(axis=1))


def fit_calibration(logits: np.ndarray, y: np.ndarray, family: Family = "auto", objective: Objective = "nll",
                    bins: int = 15, folds: int = 5, groups: np.ndarray | None = None,
                    penalties: Sequence[float] = PENALTIES, seed: int = 0) -> Calibration:
    """Temperature or vector scaling, the family and penalty chosen by ``folds``-fold cross-validated
    ``objective`` on the held-out ``logits``/``y`` alone (module doc); refitted on all of them.

    ``groups [N]`` keeps rows of one group (copies of one source sample) in one fold, so that the
    comparison is not won by memorising near-duplicates; ``family="temperature"`` compares nothing.
    """
    logits, y = _checked(logits, y)
    if family == "temperature":
        return fit_temperature(logits, y, bins, objective)
    if family not in ("vector", "auto"):
        raise DataError(f"calibration family must be 'temperature', 'vector' or 'auto', got {family!r}")
    if not penalties or not all(np.isfinite(lam) and lam > 0 for lam in penalties):
        raise DataError(f"vector-scaling penalties must be finite and > 0, got {list(penalties)}")
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    if g.shape != y.shape:
        raise DataError(f"groups must have one entry per label, got {g.shape} for {y.shape}")
    unique, index = np.unique(g, return_inverse=True)
    if not 2 <= folds <= len(unique):
        raise DataError(f"cross-validation needs 2 <= folds <= {len(unique)} groups, got {folds}")
    fold = np.random.default_rng(seed).permutation(len(unique))[index] % folds
    candidates = {**({"temperature": None} if family == "auto" else {}), **{f"vector@{lam:g}": lam for lam in penalties}}
    losses = {name: np.zeros(len(y)) for name in candidates}
    for f in range(folds):
        train, test = fold != f, fold == f
        beta0 = _beta(logits[train], y[train], objective)
        for name, lam in candidates.items():
            if lam is None:
                probs = calibrated_probabilities(logits[test], 1.0 / beta0)
            else:
                w, b = _vector(logits[train], y[train], objective, lam, beta0)
                probs = calibrated_probabilities(logits[test], scales=w, biases=b)
            losses[name][test] = _score(probs, y[test], objective)
    scores = {name: float(loss.mean()) for name, loss in losses.items()}
    best = min(scores, key=lambda name: scores[name])  # ties: the first, temperature scaling
    lam = candidates[best]
    fitted = fit_temperature(logits, y, bins, objective) if lam is None else \
        fit_vector_scaling(logits, y, lam, bins, objective)
    return replace(fitted, cv_scores=scores)
