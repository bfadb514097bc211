"""The pruning family on tensors: EGEM, PCA-EGEM (paper 000), RGEM, ridge and retraining baselines.

``METHODS`` is this family's table of implementations; ``refinement.registry`` wraps each
entry as a ``Refiner`` beside the ClArC and XS methods (the one name -> method map the
command line and the pipeline use). Every method here follows the same protocol (paper 000, Sec. 4.4, Supp. F.3): hold out
``val_share`` of the (verified) refinement data, evaluate each hyper-parameter
candidate on it, pick by the slack rule, then build the final model with the chosen
hyper-parameter from all refinement data. Retrain keeps the original when none of its
checkpoints is within the slack (``kept_original``): validation showed the fine-tuning failed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from hansgate.errors import ConfigError, DataError
from hansgate.nn.hooks import eval_mode
from hansgate.nn.training import TrainConfig, accuracy
from hansgate.refinement.baselines import (
    RETRAIN_EPOCHS,
    RIDGE_LAMBDAS,
    last_linear,
    retrain_checkpoints,
    ridge_moments,
    ridge_solve,
    with_last_layer,
)
from hansgate.refinement.egem import ALPHA_GRID, EgemConfig, select_alpha
from hansgate.refinement.selection import (
    Candidate,
    Selection,
    select_by_slack,
    validation_split,
)

__all__ = ["METHODS", "RefineConfig", "RefinementResult", "refine_model"]


class RefineConfig(BaseModel):
    """Options shared by all methods; method-specific ones are ignored by the others."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "pca-egem"
    slack: float = Field(0.05, ge=0, lt=1)
    val_share: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    layers: list[str] | None = None
    schedule: Literal["deep", "shallow"] = "deep"
    #: EGEM/PCA-EGEM choices where paper 000 is silent: the authors' code by default (``refinement.egem``)
    conv_mode: Literal["ratio", "linear"] = "ratio"
    lambda_rule: Literal["grid", "bisect"] = "grid"
    precision: Literal["float64", "float32"] = "float64"
    repetitions: int = Field(5, ge=1)
    final_fit: Literal["split", "all"] = "split"
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    ridge_lambdas: tuple[float, ...] = RIDGE_LAMBDAS
    retrain_epochs: tuple[int, ...] = RETRAIN_EPOCHS
    #: Supp. F.3's MNIST value; the paper lowers it per model (5e-6 for ResNet50, 5e-5 for VGG-16)
    retrain_lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=1)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown refinement method {v!r}; choose from {sorted(METHODS)}")
        return v


@dataclass
class RefinementResult:
    """A refined model (eval mode) and the evidence of how it was chosen (``selection``)."""

    model: nn.Module
    method: str
    layers: list[str]
    hyperparameters: dict[str, Any]
    selection: Selection
    timings: dict[str, float] = field(default_factory=dict)


def _egem(pca: bool) -> Callable[..., RefinementResult]:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RefineConfig, progress: bool) -> RefinementResult:
        ecfg = EgemConfig(pca=pca, layers=cfg.layers, schedule=cfg.schedule, conv_mode=cfg.conv_mode,
                          lambda_rule=cfg.lambda_rule, precision=cfg.precision, repetitions=cfg.repetitions,
                          final_fit=cfg.final_fit, alpha_grid=cfg.alpha_grid, slack=cfg.slack,
                          val_share=cfg.val_share, batch_size=cfg.batch_size, seed=cfg.seed)
        t0 = time.perf_counter()
        res = select_alpha(model, x, y, ecfg, progress)
        hp: dict[str, Any] = {
            "alpha": res.alpha,
            "schedule": cfg.schedule,
            "taus": res.taus,
            "lambdas": res.lambdas,
            "units": {k: ("element" if v else "channel") for k, v in res.minimizer.per_element_.items()},
            "slack": cfg.slack,
            "repetitions": cfg.repetitions,
            "final_fit": cfg.final_fit,
            "lambda_rule": cfg.lambda_rule,
        }
        if pca:
            hp |= {"conv_mode": cfg.conv_mode, "conv_modes": res.minimizer.conv_modes_, "precision": cfg.precision}
        return RefinementResult(res.model, "pca-egem" if pca else "egem", res.minimizer.layers_, hp, res.selection,
                                {"selection_s": time.perf_counter() - t0})

    return run


def _ridge(targets: Literal["logits", "labels"]) -> Callable[..., RefinementResult]:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RefineConfig, progress: bool) -> RefinementResult:
        layer = last_linear(model, x[:2])
        fit_idx, val_idx = validation_split(len(y), cfg.val_share, cfg.seed)
        k = int(model.get_submodule(layer).out_features)  # type: ignore[arg-type]
        onehot = F.one_hot(y, k).double() if targets == "labels" else None
        t0 = time.perf_counter()

        def moments(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return ridge_moments(model, layer, x[idx], None if onehot is None else onehot[idx], cfg.batch_size)

        gram, cross = moments(fit_idx)
        orig = accuracy(model, x[val_idx], y[val_idx])
        cands = []
        for lam in sorted(cfg.ridge_lambdas, reverse=True):  # strongest (largest lambda) first
            w, b = ridge_solve(gram, cross, lam)
            cands.append(Candidate({"lambda": lam}, accuracy(with_last_layer(model, layer, w, b), x[val_idx],
                                                             y[val_idx])))
        sel = select_by_slack(cands, orig, cfg.slack)
        gram, cross = moments(torch.arange(len(y)))
        w, b = ridge_solve(gram, cross, sel.chosen.params["lambda"])
        refined = with_last_layer(model, layer, w, b)
        hp = {"lambda": sel.chosen.params["lambda"], "targets": targets, "slack": cfg.slack}
        return RefinementResult(refined, "rgem" if targets == "logits" else "ridge", [layer], hp, sel,
                                {"selection_s": time.perf_counter() - t0})

    return run


def _retrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RefineConfig, progress: bool) -> RefinementResult:
    fit_idx, val_idx = validation_split(len(y), cfg.val_share, cfg.seed)
    t0 = time.perf_counter()
    orig = accuracy(model, x[val_idx], y[val_idx])
    tcfg = TrainConfig(lr=cfg.retrain_lr, seed=cfg.seed)
    checkpoints = retrain_checkpoints(model, x[fit_idx], y[fit_idx], x[val_idx], y[val_idx], cfg.retrain_epochs, tcfg)
    cands = [Candidate({"epochs": e}, checkpoints[e][0]) for e in sorted(checkpoints, reverse=True)]
    sel = select_by_slack(cands, orig, cfg.slack)
    refined = copy.deepcopy(model)
    # no checkpoint within the slack (e.g. a learning rate too large for the model): the fine-tuning
    # failed on the held-out data, so the original is kept rather than a model validation rejected
    epochs = sel.chosen.params["epochs"] if sel.qualified else 0
    if epochs:
        refined.load_state_dict(checkpoints[epochs][1])
    hp = {"epochs": epochs, "lr": cfg.retrain_lr, "slack": cfg.slack, "grad_clip_norm": 1e-3,
          "batchnorm": "frozen (statistics and affine parameters)", "kept_original": not sel.qualified}
    return RefinementResult(refined.eval(), "retrain", [], hp, sel, {"selection_s": time.perf_counter() - t0})


METHODS: dict[str, Callable[..., RefinementResult]] = {
    "egem": _egem(pca=False),
    "pca-egem": _egem(pca=True),
    "rgem": _ridge("logits"),
    "ridge": _ridge("labels"),
    "retrain": _retrain,
}


def refine_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RefineConfig | None = None,
                 progress: bool = False) -> RefinementResult:
    """Refine ``model`` on verified samples ``x`` ``[N, C, H, W]``, ``y`` ``[N]`` with ``config.method``.

    ``model`` runs in eval mode meanwhile; its own train/eval flags come back afterwards.
    """
    cfg = config or RefineConfig()
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown refinement method {cfg.method!r}; choose from {sorted(METHODS)}")
    if len(x) != len(y) or len(y) < 5:
        raise DataError(f"need at least 5 refinement samples with one label each, got {len(x)} images and "
                        f"{len(y)} labels")
    with eval_mode(model):
        return METHODS[cfg.method](model, x, y, cfg, progress)
