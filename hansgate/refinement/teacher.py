"""Teacher-made annotation masks for explanatory supervision (paper 002, Eq. 12-15).

A teacher is pre-trained on a small clean subset (paper 002: 10 % or 1 % of the
training data). Its explanation of a contaminated image is the absolute input
gradient of the class logit, summed over channels and normalised per image to
[0, 1] (Eq. 13); the annotation mask is 1 where that saliency is below ``tau``
(Eq. 14): regions the teacher finds unimportant, which should include the
spurious signal if the teacher does not rely on it (Eq. 1). The student is then
trained on the contaminated data with these masks (Eq. 15, see ``refinement.xs``).
"""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.errors import ConfigError, DataError
from hansgate.nn.models import build_builtin
from hansgate.nn.training import TrainConfig, train_classifier

__all__ = ["TeacherConfig", "Teacher", "normalized_saliency", "threshold_masks", "mask_precision_recall"]


class TeacherConfig(BaseModel):
    """The teacher: a built-in architecture trained with cross-entropy (paper 002: the two-layer CNN for MNIST)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "mnist_cnn"
    tau: float = Field(0.01, gt=0, le=1, description="mask = 1 where normalised saliency < tau (Eq. 14)")
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0


def normalized_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                        batch_size: int = 256) -> torch.Tensor:
    """Paper 002 Eq. 13 with input gradients: ``|d f_y / dx|`` summed over channels, divided by each image's max.

    ``x`` ``[N, C, H, W]``; ``y`` ``[N]`` the classes to explain (default: the
    predicted ones). Returns ``[N, 1, H, W]`` in [0, 1] (an all-zero gradient stays 0).
    The model is run in eval mode and left as it was.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].detach().clone().requires_grad_(True)
            logits = model(xb)
            cls = logits.argmax(1) if y is None else y[i : i + batch_size]
            (grad,) = torch.autograd.grad(logits.gather(1, cls.view(-1, 1)).sum(), xb)
            sal = grad.abs().sum(dim=1, keepdim=True)
            peak = sal.flatten(1).max(1).values.clamp_min(torch.finfo(sal.dtype).tiny).view(-1, 1, 1, 1)
            out.append((sal / peak).detach())
    finally:
        model.train(was_training)
    return torch.cat(out)


def threshold_masks(saliency: torch.Tensor, tau: float) -> torch.Tensor:
    """Paper 002 Eq. 14: ``M = 1(E < tau)`` elementwise, float ``[N, 1, H, W]``."""
    if not 0 < tau <= 1:
        raise ConfigError(f"tau must lie in (0, 1], got {tau}")
    return (saliency < tau).to(saliency.dtype)


def mask_precision_recall(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Pixel-level precision, recall and coverage of predicted masks against ground-truth ones (micro over all pixels).

    ``coverage`` is the share of all pixels the predicted masks mark.
    """
    if pred.shape != truth.shape:
        raise DataError(f"mask shapes differ: {tuple(pred.shape)} vs {tuple(truth.shape)}")
    p, t = pred.bool(), truth.bool()
    tp = (p & t).sum().item()
    return {
        "precision": tp / max(p.sum().item(), 1),
        "recall": tp / max(t.sum().item(), 1),
        "coverage": p.float().mean().item(),
    }


class Teacher:
    """Estimator: ``fit`` pre-trains a teacher on clean images; ``masks`` annotates contaminated ones.

    Learned attributes: ``model_`` (the trained teacher, eval mode), ``n_train_``.
    """

    def __init__(self, config: TeacherConfig | None = None, model: nn.Module | None = None) -> None:
        self.config = config or TeacherConfig()
        self.model = model

    def fit(self, x_clean: torch.Tensor, y_clean: torch.Tensor, num_classes: int | None = None) -> "Teacher":
        """Train on a clean subset ``x_clean`` ``[N, C, H, W]``, ``y_clean`` ``[N]``."""
        if len(x_clean) != len(y_clean) or len(y_clean) < 2:
            raise DataError(f"a teacher needs at least 2 labelled clean images, got {len(x_clean)} images and "
                            f"{len(y_clean)} labels")
        cfg = self.config
        if self.model is not None:
            model = copy.deepcopy(self.model)
        else:
            torch.manual_seed(cfg.seed)
            k = num_classes or int(y_clean.max()) + 1
            model = build_builtin(cfg.model, num_classes=k, in_channels=x_clean.shape[1], image_size=x_clean.shape[-1])
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
        self.model_ = train_classifier(model, x_clean, y_clean, tcfg)
        self.n_train_ = len(y_clean)
        return self

    def saliency(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised input-gradient saliency ``[N, 1, H, W]`` of the trained teacher (Eq. 13)."""
        self._check_fitted()
        return normalized_saliency(self.model_, x, y)

    def masks(self, x: torch.Tensor, y: torch.Tensor | None = None, tau: float | None = None) -> torch.Tensor:
        """Teacher annotations ``[N, 1, H, W]``: 1 where the saliency is below ``tau`` (Eq. 14)."""
        return threshold_masks(self.saliency(x, y), self.config.tau if tau is None else tau)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError("the teacher is not fitted; call fit(x_clean, y_clean) first")
