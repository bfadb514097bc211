"""The ClArC family: P-ClArC, A-ClArC and RR-ClArC (paper 001, Sec. 3.2, 3.3, 4.4).

All three model a concept (a shortcut) by a unit CAV ``h`` at the concept layer
(``concepts.cav``; default the last conv layer, Sec. 4.1). Where the paper is silent the
defaults are the authors' reference setup, the project's earlier choices are named options
(``refinement.clarc_core``: ``ClarcConfig``, ``PROJECT_SETUP``):

- **CAV features**: the per-channel spatial max (``pooling="max"``), moved by the same
  offset at every position. ``pooling="none"`` keeps the full ``C x H x W`` map, which can
  express *where* a localized artifact sits.
- **P-ClArC** (Eq. 3, no training): a ``ClarcProjection`` after the concept layer moves
  every activation along ``h`` so that its pooled length ``pool(a) . h`` equals the mean
  length over clean samples: ``a' = a + (z - pool(a) . h) / (h . h) * h``. The projection is
  an ``nn.units`` unit: the bundle carries it (CAV and target in ``refined.safetensors``), so
  the audit rebuilds and explains the served model.
- **A-ClArC**: the same projection with ``z`` = the mean length over samples *with* the
  concept, applied to every sample while the layers after the concept layer are
  fine-tuned; the returned model is the fine-tuned one *without* the projection (the
  augmentation teaches invariance, as data augmentation does; this choice is ours).
- **RR-ClArC** (Eq. 5): fine-tuning with ``CE + lambda * mean_n ((grad_a [m_n . f(a_n)] . h)^2)``,
  the gradient averaged over spatial positions, evaluated on the batch's own samples
  (``penalty_samples="batch"``; ``concept`` adds concept-carrying samples of the concept
  data, which helps when few training points carry the artifact). ``m``: ``random`` (a
  fresh +-1 per sample and logit; the paper's default), ``all`` (ones), or ``class``
  (one-hot on ``target_class``: class-specific unlearning, Sec. 4.4).

Fine-tuning (``refinement.clarc_tuning.FineTuner``) freezes every layer up to the concept
layer, as Eq. 6 requires, and by default every conv and batch-norm layer (reference code);
class-weighted cross-entropy; SGD with momentum 0.9 at 1e-4, 10 epochs, batch 64.

``lambda`` is chosen on a validation split of the concept data: the value with the best
*balanced* accuracy over held-out samples with and without the concept (ties: the larger
lambda; runs whose loss diverged are skipped); the candidates are kept as evidence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hansgate.concepts.cav import ConceptActivationVector, default_concept_layer, layer_activations, pool_channels
from hansgate.errors import ConfigError, DataError, ModelRunError
from hansgate.nn.hooks import eval_mode
from hansgate.nn.training import accuracy
from hansgate.refinement.clarc_core import (
    CLARC_METHODS,
    PROJECT_LAMBDAS,
    PROJECT_SETUP,
    RR_LAMBDAS,
    ClarcConfig,
    ClarcProjection,
    ConceptData,
    annotation_vector,
    class_weights,
    project_along,
    rr_penalty,
    with_projection,
)
from hansgate.refinement.clarc_tuning import FineTuner

__all__ = [
    "CLARC_METHODS",
    "RR_LAMBDAS",
    "PROJECT_LAMBDAS",
    "PROJECT_SETUP",
    "ClarcConfig",
    "ConceptData",
    "ClarcProjection",
    "project_along",
    "annotation_vector",
    "rr_penalty",
    "class_weights",
    "with_projection",
    "FineTuner",
    "ClarcResult",
    "fit_concept",
    "balanced_accuracy",
    "refine_clarc",
]


@dataclass
class ClarcResult:
    """A corrected model and the evidence of how it was made."""

    model: nn.Module
    method: str
    layer: str
    cav: ConceptActivationVector
    hyperparameters: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def fit_concept(model: nn.Module, layer: str, data: ConceptData, kind: str = "signal", pooling: str = "mean",
                seed: int = 0) -> tuple[ConceptActivationVector, float, float]:
    """CAV on ``data`` plus the mean pooled lengths ``(z_clean, z_concept)`` along it (P-/A-ClArC targets)."""
    acts = pool_channels(layer_activations(model, layer, data.x), pooling)
    cav = ConceptActivationVector(kind, seed=seed).fit(acts, data.concept)
    lengths = acts @ cav.cav_
    return cav, float(lengths[~data.concept].mean()), float(lengths[data.concept].mean())


def balanced_accuracy(model: nn.Module, data: ConceptData) -> float:
    """Mean of the accuracies on the samples with and without the concept."""
    c = data.concept
    return 0.5 * (accuracy(model, data.x[c], data.y[c]) + accuracy(model, data.x[~c], data.y[~c]))


def refine_clarc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, concept: ConceptData,
                 config: ClarcConfig | None = None) -> ClarcResult:
    """Correct ``model`` for ``concept`` with ``config.method``; fine-tunes on ``x``, ``y`` (not for P-ClArC).

    The concept data is split (``val_share``, stratified): the CAV and the ClArC targets come
    from the fit part; lambda (RR-ClArC) is chosen on the validation part (module docstring).
    ``model`` is not changed, its train/eval mode included.
    """
    cfg = config or ClarcConfig()
    if cfg.method not in CLARC_METHODS:
        raise ConfigError(f"unknown ClArC method {cfg.method!r}; choose from {list(CLARC_METHODS)}")
    if cfg.method != "p-clarc" and (len(x) != len(y) or len(y) < 2):
        raise DataError(f"fine-tuning needs labelled samples, got {len(x)} images and {len(y)} labels")
    with eval_mode(model):
        return _refine(model, x, y, concept, cfg)


def _refine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, concept: ConceptData, cfg: ClarcConfig) -> ClarcResult:
    layer = cfg.layer or default_concept_layer(model, concept.x[:1])
    t0 = time.perf_counter()
    fit_part, val_part = concept.split(cfg.val_share, cfg.seed)
    cav, z_clean, z_concept = fit_concept(model, layer, fit_part, cfg.cav_kind, cfg.pooling, cfg.seed)
    hp: dict[str, Any] = {"layer": layer, "cav_kind": cfg.cav_kind, "pooling": cfg.pooling, "cav": cav.as_dict()}
    timings = {"cav_s": time.perf_counter() - t0}
    candidates: list[dict[str, Any]] = []
    tuning = {"epochs": cfg.epochs, "lr": cfg.lr, "optimizer": cfg.optimizer, "freeze": cfg.freeze,
              "class_weighted": cfg.class_weighted}
    if cfg.method == "p-clarc":
        refined = with_projection(model, layer, cav.cav_, z_clean, cfg.pooling)
        hp |= {"target_length": z_clean}
    elif cfg.method == "a-clarc":
        tuner = FineTuner(layer, cfg, "a-clarc", cav.cav_, target=z_concept).fit(model, x, y)
        refined = tuner.model_
        hp |= {"target_length": z_concept} | tuning
        timings["finetune_s"] = tuner.seconds_
    else:
        x_penalty = fit_part.x[fit_part.concept] if cfg.penalty_samples == "concept" else None
        best: tuple[float, float, nn.Module] | None = None
        for lam in sorted(cfg.lambdas, reverse=True):
            tuner = FineTuner(layer, cfg, "rr", cav.cav_, lam=lam).fit(model, x, y, x_penalty=x_penalty)
            score = float("nan") if tuner.diverged_ else balanced_accuracy(tuner.model_, val_part)
            candidates.append({"lambda": lam, "val_balanced_acc": score, "diverged": tuner.diverged_,
                               "seconds": tuner.seconds_})
            if not tuner.diverged_ and (best is None or score > best[1]):
                best = (lam, score, tuner.model_)
        if best is None:
            raise ModelRunError(f"RR-ClArC diverged at every lambda of {list(cfg.lambdas)}; lower lr or the lambdas")
        refined = best[2]
        hp |= {"lambda": best[0], "val_balanced_acc": best[1], "mode": cfg.mode, "target_class": cfg.target_class,
               "penalty_samples": cfg.penalty_samples, "selection":
               "max balanced accuracy on held-out concept data (ties: larger lambda; diverged runs skipped)"} | tuning
        timings["selection_s"] = time.perf_counter() - t0 - timings["cav_s"]
    hp["val_balanced_acc_original"] = balanced_accuracy(model, val_part)
    hp["val_balanced_acc_refined"] = balanced_accuracy(refined, val_part)
    return ClarcResult(refined, cfg.method, layer, cav, hp, candidates, timings)
