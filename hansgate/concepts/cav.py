"""Concept Activation Vectors: signal-CAV, regression CAVs and their alignment (paper 001, Sec. 3.1, 4.2).

A concept is a direction ``h`` in the activation space of one layer (the *concept
layer*). CAVs are fitted on activations reduced by a ``pooling``:

- ``mean`` (default) / ``max``: conv activations ``[N, C, H, W]`` pooled per channel to
  ``[N, C]`` (the paper's reference code uses the spatial max). Such a CAV acts on the full
  activation as the *same* offset at every spatial position (``lift_cav``),
  ``a + e * h[:, None, None]``, which moves the pooled activation by exactly ``e * h``.
- ``none``: the full map flattened to ``[N, C * H * W]``; the CAV is a map itself. This
  keeps *where* a localized artifact sits, which a channel-pooled direction cannot
  express (``refinement.clarc`` offers it beside the reference's ``max``).

``pool_gradient`` reduces a gradient w.r.t. the full activation so that
``pool_gradient(g) @ h`` is the directional derivative along ``lift_cav(h)``; TCAV
(``audit.tcav``) and the concept heads (``refinement.concept_heads``) use that direction.
Linear-layer activations ``[N, D]`` are used as they are. The default concept layer is
the last conv layer (paper 001, Sec. 4.1); a conv inside a torchvision residual block is
replaced by its enclosing block, because the block output is where the rest of the network
reads from (a "cut" of the graph).

CAV kinds (``CAV_KINDS``), all normalised to unit length and oriented towards the
concept (``t = 1``):

- ``signal``: Eq. 2, ``h = sum (a - mean_a)(t - mean_t)`` (no hyper-parameter);
- ``svm`` / ``logistic``: scikit-learn ``LinearSVC`` / ``LogisticRegression`` with
  ``C = 1 / gamma``; ``ridge``: ``RidgeClassifier(alpha=gamma)``; ``lasso``:
  ``Lasso(alpha=gamma)`` on targets ``+-1``. Features are centred, no intercept,
  classes balanced (weights), ``gamma`` from ``REGULARIZATION_GRID`` = 10^-5 ... 10^5
  (Sec. 4.1). ``selection="cv"`` (default, as the reference code's grid search): 5-fold
  stratified cross-validation in order, the estimator's own score (accuracy; R^2 of the
  +-1 targets for lasso), ties to the first gamma of the grid; ``"holdout"``: accuracy on
  a stratified held-out share, ties to the stronger regularisation. Either way the chosen
  gamma is refitted on all the data.

Alignment with the true artifact direction (Sec. 4.2) for artifacts that can be
pasted: ``delta = pool(a(phi(x))) - pool(a(x))``; Eq. 7 is the mean per-sample
cosine, Eq. 8 the cosine with the mean change.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hansgate.errors import ConfigError, DataError, ModelRunError
from hansgate.nn.hooks import capture, eval_mode
from hansgate.nn.training import forward_batch_size

__all__ = [
    "CAV_KINDS",
    "POOLINGS",
    "REGULARIZATION_GRID",
    "pool_channels",
    "lift_cav",
    "pool_gradient",
    "default_concept_layer",
    "layer_activations",
    "pooled_activations",
    "activation_change",
    "signal_cav",
    "sample_alignment",
    "mean_alignment",
    "ConceptActivationVector",
]

CAV_KINDS: tuple[str, ...] = ("signal", "svm", "ridge", "lasso", "logistic")
POOLINGS: tuple[str, ...] = ("mean", "max", "none")
#: Paper 001, Sec. 4.1: gamma in {10^-5, ..., 10^5} for every regression CAV.
REGULARIZATION_GRID: tuple[float, ...] = tuple(10.0**k for k in range(-5, 6))


# --------------------------------------------------------------------------- activations


def pool_channels(a: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """``[N, C, *spatial]`` -> ``[N, C]`` by the spatial mean or max, or ``[N, C * H * W]`` (``none``).

    ``[N, D]`` is returned unchanged.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
    if a.dim() == 2:
        return a
    if pooling == "none":
        return a.flatten(1)
    flat = a.flatten(2)
    return flat.amax(dim=2) if pooling == "max" else flat.mean(dim=2)


def lift_cav(cav: torch.Tensor, a: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """The activation-space direction of a CAV, shaped to broadcast over ``a`` ``[N, C, *spatial]``.

    ``mean``/``max``: the same offset ``h`` at every position; ``none``: ``h`` reshaped to one map.
    """
    if a.dim() == 2:
        return cav.to(a).view(1, -1)
    if pooling == "none":
        return cav.to(a).view((1,) + tuple(a.shape[1:]))
    return cav.to(a).view((1, -1) + (1,) * (a.dim() - 2))


def pool_gradient(g: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """``[N, C, *spatial]`` gradient -> ``[N, D]`` with ``pool_gradient(g) @ h`` = derivative along ``lift_cav(h)``."""
    if g.dim() == 2:
        return g
    return g.flatten(1) if pooling == "none" else g.flatten(2).sum(2)


def _residual_types() -> tuple[type, ...]:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return (BasicBlock, Bottleneck)


def default_concept_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the last conv layer that runs (or its enclosing residual block), paper 001 Sec. 4.1."""
    from hansgate.nn.surgery import run_hooked

    named = dict(model.named_modules())
    order: list[str] = []

    def record(name: str) -> Callable[[nn.Module, object, object], None]:
        return lambda mod, inp, out: order.append(name)

    run_hooked(model, example[:1], [(m, record(n)) for n, m in named.items() if n and isinstance(m, nn.Conv2d)])
    if not order:
        raise ConfigError("the model has no conv layer; name the concept layer explicitly")
    name = order[-1]
    parts = name.split(".")
    residual = _residual_types()
    for i in range(1, len(parts)):  # outermost enclosing residual block, if any
        prefix = ".".join(parts[:i])
        if isinstance(named.get(prefix), residual):
            return prefix
    return name


@torch.no_grad()
def layer_activations(model: nn.Module, layer: str, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Output of ``layer`` for every sample of ``x``, eval mode, batched (``batch_size`` ``None``:
    ``nn.training.forward_batch_size``, at most 256): ``[N, ...]``."""
    if len(x) == 0:
        raise DataError("no samples to compute activations on")
    batch_size = batch_size or forward_batch_size(int(x[0].numel()), cap=256)
    out = []
    try:
        with eval_mode(model), capture(model, [layer]) as store:
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size])
                out.append(store[layer].pop())
    except RuntimeError as exc:
        raise ModelRunError(f"the model does not run on inputs of shape {tuple(x.shape[1:])}: "
                            f"{str(exc).splitlines()[0]}") from exc
    return torch.cat(out)


def pooled_activations(model: nn.Module, layer: str, x: torch.Tensor, pooling: str = "mean",
                       batch_size: int | None = None) -> torch.Tensor:
    """Channel-pooled activations ``[N, C]`` of ``layer`` (see module docstring)."""
    pool_channels(x.new_zeros(1, 1), pooling)  # validates the name before running the model
    batch_size = batch_size or forward_batch_size(int(x[0].numel()) if len(x) else 1, cap=256)
    parts = []
    for i in range(0, len(x), batch_size):
        parts.append(pool_channels(layer_activations(model, layer, x[i : i + batch_size], batch_size), pooling))
    return torch.cat(parts)


def activation_change(model: nn.Module, layer: str, x: torch.Tensor, x_tilde: torch.Tensor,
                      pooling: str = "mean") -> torch.Tensor:
    """``Delta a = pooled a(x_tilde) - pooled a(x)`` ``[N, C]`` (paper 001, Sec. 4.2); ``x_tilde = phi(x)``."""
    if x.shape != x_tilde.shape:
        raise DataError(f"x {tuple(x.shape)} and x_tilde {tuple(x_tilde.shape)} must have the same shape")
    return pooled_activations(model, layer, x_tilde, pooling) - pooled_activations(model, layer, x, pooling)


# --------------------------------------------------------------------------- math


def signal_cav(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Paper 001, Eq. 2: ``h = sum_n (a_n - mean a)(t_n - mean t)`` for ``a`` ``[N, D]``, ``t`` ``[N]``; ``[D]``.

    Not normalised (the estimator normalises); ``t`` is 0/1 (bool accepted).
    """
    if a.dim() != 2 or t.dim() != 1 or len(a) != len(t):
        raise DataError(f"signal_cav needs a [N, D] and t [N], got {tuple(a.shape)} and {tuple(t.shape)}")
    a64, t64 = a.double(), t.double()
    return ((a64 - a64.mean(0)) * (t64 - t64.mean()).unsqueeze(1)).sum(0).to(a.dtype)


def sample_alignment(cav: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine ``h . Da_n / (|h| |Da_n|)`` ``[N]`` (the terms of paper 001, Eq. 7).

    Samples whose activations do not change (``|Da_n| = 0``) get cosine 0.
    """
    h = cav.double() / cav.double().norm()
    d = delta.double()
    norms = d.norm(dim=1)
    cos = (d @ h) / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(norms > 0, cos, torch.zeros_like(cos))


def mean_alignment(cav: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    """``(s, s_bar)``: Eq. 7 (mean per-sample cosine) and Eq. 8 (cosine with the mean change)."""
    s = float(sample_alignment(cav, delta).mean())
    mean_delta = delta.double().mean(0)
    h = cav.double()
    denom = float(h.norm() * mean_delta.norm())
    s_bar = float(h @ mean_delta) / denom if denom > 0 else 0.0
    return s, s_bar


# --------------------------------------------------------------------------- estimator


def _as_numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)


def _regressor(kind: str, gamma: float, seed: int) -> Any:
    from sklearn.linear_model import Lasso, LogisticRegression, RidgeClassifier
    from sklearn.svm import LinearSVC

    if kind == "svm":
        return LinearSVC(C=1.0 / gamma, fit_intercept=False, class_weight="balanced", max_iter=5000, random_state=seed)
    if kind == "logistic":
        return LogisticRegression(C=1.0 / gamma, fit_intercept=False, class_weight="balanced", max_iter=2000)
    if kind == "ridge":
        return RidgeClassifier(alpha=gamma, fit_intercept=False, class_weight="balanced")
    if kind == "lasso":
        return Lasso(alpha=gamma, fit_intercept=False, max_iter=5000, random_state=seed)
    raise ConfigError(f"unknown CAV kind {kind!r}; choose from {list(CAV_KINDS)}")  # pragma: no cover


def _fit_direction(kind: str, gamma: float, a: np.ndarray, t: np.ndarray, seed: int) -> tuple[np.ndarray, bool]:
    """Weight vector of one regression CAV (oriented towards ``t = 1``) and whether the solver converged."""
    from sklearn.exceptions import ConvergenceWarning

    est = _regressor(kind, gamma, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if kind == "lasso":  # no class_weight: balanced sample weights instead, targets +-1
            w = np.where(t, 0.5 / max(t.mean(), 1e-12), 0.5 / max(1 - t.mean(), 1e-12))
            est.fit(a, np.where(t, 1.0, -1.0), sample_weight=w)
        else:
            est.fit(a, t.astype(int))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return np.asarray(est.coef_, dtype=np.float64).reshape(-1), converged


class ConceptActivationVector:
    """A CAV of one ``kind`` fitted on pooled activations ``a`` ``[N, D]`` and concept labels ``t`` ``[N]``.

    Parameters: ``kind`` (``CAV_KINDS``), ``grid`` (regularisation strengths gamma for
    regression kinds), ``selection`` (``cv`` or ``holdout``, module docstring), ``folds``
    (for ``cv``), ``val_share`` (held-out share for ``holdout``), ``seed``.

    Learned: ``cav_`` unit vector ``[D]`` (float32), ``raw_`` the un-normalised solution,
    ``mean_`` mean activation of the fitting data ``[D]``, ``regularization_`` (gamma or
    None), ``val_accuracy_`` (the chosen gamma's validation score; None for signal),
    ``candidates_`` ``[{gamma, val_accuracy, converged}]``, ``converged_``.
    """

    def __init__(self, kind: str = "signal", grid: tuple[float, ...] = REGULARIZATION_GRID, val_share: float = 0.25,
                 seed: int = 0, selection: str = "cv", folds: int = 5) -> None:
        self.kind = kind
        self.grid = grid
        self.val_share = val_share
        self.seed = seed
        self.selection = selection
        self.folds = folds

    def fit(self, a: torch.Tensor | np.ndarray, t: torch.Tensor | np.ndarray) -> "ConceptActivationVector":
        if self.kind not in CAV_KINDS:
            raise ConfigError(f"unknown CAV kind {self.kind!r}; choose from {list(CAV_KINDS)}")
        a_np = _as_numpy(a)
        t_np = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t).astype(bool).reshape(-1)
        if a_np.ndim != 2 or len(a_np) != len(t_np):
            raise DataError(f"CAV needs activations [N, D] and labels [N], got {a_np.shape} and {t_np.shape}")
        n_pos = int(t_np.sum())
        if n_pos < 2 or len(t_np) - n_pos < 2:
            raise DataError(f"a CAV needs at least 2 samples with and 2 without the concept (got {n_pos} and "
                            f"{len(t_np) - n_pos})")
        if not np.isfinite(a_np).all():
            raise DataError("activations contain NaN or infinite values")
        self.mean_ = torch.from_numpy(a_np.mean(0)).float()
        centred = a_np - a_np.mean(0)
        self.candidates_: list[dict[str, Any]] = []
        self.regularization_: float | None = None
        self.val_accuracy_: float | None = None
        self.converged_ = True
        if self.kind == "signal":
            raw = signal_cav(torch.from_numpy(a_np), torch.from_numpy(t_np)).numpy()
        else:
            raw = self._fit_regression(centred, t_np)
        norm = float(np.linalg.norm(raw))
        if not np.isfinite(norm) or norm == 0.0:
            raise DataError(f"the {self.kind} CAV is zero: the concept does not change the activations")
        self.raw_ = torch.from_numpy(raw).float()
        self.cav_ = torch.from_numpy(raw / norm).float()
        return self

    def _fit_regression(self, a: np.ndarray, t: np.ndarray) -> np.ndarray:
        if self.selection == "cv":
            ranked = self._cv_ranking(a, t)
        elif self.selection == "holdout":
            ranked = self._holdout_ranking(a, t)
        else:
            raise ConfigError(f"unknown gamma selection {self.selection!r}; choose cv or holdout")
        for cand in ranked:  # a gamma whose refit on all data is the zero vector (lasso) gives way to the next
            w, self.converged_ = _fit_direction(self.kind, cand["gamma"], a, t, self.seed)
            if np.any(w):
                self.regularization_, self.val_accuracy_ = cand["gamma"], cand["val_accuracy"]
                return w
        raise DataError(f"every {self.kind} CAV on the grid is zero; the concept is not separable here")

    def _score(self, a: np.ndarray, t: np.ndarray, w: np.ndarray) -> float:
        """The estimator's own score: accuracy of ``sign(a . w)``; R^2 of the +-1 targets for lasso."""
        pred = a @ w
        if self.kind != "lasso":
            return float(((pred > 0) == t).mean())
        target = np.where(t, 1.0, -1.0)
        return float(1.0 - ((target - pred) ** 2).sum() / ((target - target.mean()) ** 2).sum())

    def _cv_ranking(self, a: np.ndarray, t: np.ndarray) -> list[dict[str, Any]]:
        """Gammas by mean score over stratified folds (no shuffling), ties to the first of the grid."""
        from sklearn.model_selection import StratifiedKFold

        folds = min(self.folds, int(t.sum()), int((~t).sum()))
        if folds < 2:
            raise DataError("too few concept samples to cross-validate the regression CAV")
        splits = list(StratifiedKFold(n_splits=folds).split(a, t))
        for gamma in self.grid:
            scores, ok = [], True
            for train, test in splits:
                w, conv = _fit_direction(self.kind, gamma, a[train], t[train], self.seed)
                scores.append(self._score(a[test], t[test], w))
                ok = ok and conv
            self.candidates_.append({"gamma": gamma, "val_accuracy": float(np.mean(scores)), "converged": ok})
        order = sorted(range(len(self.candidates_)), key=lambda i: (-self.candidates_[i]["val_accuracy"], i))
        return [self.candidates_[i] for i in order]

    def _holdout_ranking(self, a: np.ndarray, t: np.ndarray) -> list[dict[str, Any]]:
        """Gammas by accuracy on a stratified held-out share, ties to the stronger regularisation."""
        rng = np.random.default_rng(self.seed)
        val = np.zeros(len(t), dtype=bool)
        for label in (True, False):  # stratified hold-out
            idx = rng.permutation(np.flatnonzero(t == label))
            val[idx[: max(1, int(round(self.val_share * len(idx))))]] = True
        if (t[~val].sum() < 1) or ((~t[~val]).sum() < 1):
            raise DataError("too few concept samples to hold out validation data for the regression CAV")
        for gamma in sorted(self.grid, reverse=True):  # strongest regularisation first
            w, ok = _fit_direction(self.kind, gamma, a[~val], t[~val], self.seed)
            acc = float(((a[val] @ w > 0) == t[val]).mean()) if np.any(w) else float("nan")
            self.candidates_.append({"gamma": gamma, "val_accuracy": acc, "converged": ok})
        return sorted((c for c in self.candidates_ if not np.isnan(c["val_accuracy"])),
                      key=lambda c: (-c["val_accuracy"], -c["gamma"]))

    def score(self, a: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
        """Concept score ``(a - center) . cav_`` ``[N]`` (``center`` defaults to ``mean_``)."""
        c = self.mean_ if center is None else center
        return (a.float() - c) @ self.cav_

    def as_dict(self) -> dict[str, Any]:
        """Plain evidence (JSON-able)."""
        return {"kind": self.kind, "regularization": self.regularization_, "val_accuracy": self.val_accuracy_,
                "converged": self.converged_, "candidates": self.candidates_, "dim": int(self.cav_.numel())}
