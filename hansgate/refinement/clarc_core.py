"""ClArC's options, concept data and closed-form pieces (paper 001, Eq. 3 and Eq. 5).

Eq. 3 itself (``project_along``, ``ClarcProjection``) lives in ``nn.units``, re-exported here: a
bundle carries a P-ClArC model's projection as a unit that the audit, which may not import
``refinement``, rebuilds. Split from ``refinement.clarc`` (the methods) and
``refinement.clarc_tuning`` (the fine-tuner) so that each stays readable;
``refinement.clarc`` re-exports every name.

Defaults follow the authors' reference setup wherever paper 001 is silent
(``seeds/IMPLEMENTATION-NOTES.md``): channel CAVs from the spatial **max** of the concept
layer, the RR penalty on the batch's own samples, every conv and batch-norm layer frozen,
class-weighted cross-entropy, SGD with momentum 0.9 at learning rate 1e-4 for 10 epochs of
batch 64, and lambda from 0.05 to 1e8. The project's earlier setup stays available as
named options (``PROJECT_SETUP``): full-map CAVs (``pooling="none"``), the penalty also on
concept-carrying samples, only the layers up to the concept layer frozen, plain
cross-entropy, Adam at 3e-3 and lambda 1 ... 1e5. ``benchmarks/concepts_bench.py``
measures both on the same runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.concepts.cav import pool_gradient
from hansgate.errors import ConfigError, DataError
from hansgate.nn.surgery import insert_after
from hansgate.nn.units import ClarcProjection, project_along  # Eq. 3 is a rebuildable unit (nn.units)

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
]

CLARC_METHODS: tuple[str, ...] = ("p-clarc", "a-clarc", "rr-clarc")
#: The reference code's lambda range 0.05 ... 1e8; the steps between (one per decade) are our choice.
RR_LAMBDAS: tuple[float, ...] = (0.05,) + tuple(10.0**k for k in range(-1, 9))
#: The project's earlier grid, used with ``PROJECT_SETUP``.
PROJECT_LAMBDAS: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


class ClarcConfig(BaseModel):
    """Options of the ClArC methods; defaults are the authors' reference setup (module docstring).

    ``pooling``: how CAV features are read from the concept layer (``max``: per-channel
    spatial max, the reference; ``none``: the full map; ``mean``). ``penalty_samples``:
    ``batch`` evaluates RR-ClArC's penalty on the fine-tuning batch itself (reference);
    ``concept`` adds as many concept-carrying samples of the concept data per batch.
    ``freeze``: ``conv_bn`` freezes every conv and batch-norm layer (reference), ``features``
    only the layers up to and including the concept layer (what Eq. 6 requires).
    ``class_weighted``: cross-entropy weighted by inverse class frequency of the fine-tuning
    labels. ``optimizer``: ``sgd`` (with ``momentum``) or ``adam`` at ``lr``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "rr-clarc"
    layer: str | None = None
    cav_kind: str = "signal"
    pooling: str = "max"
    mode: Literal["random", "all", "class"] = "random"
    target_class: int | None = None
    lambdas: tuple[float, ...] = RR_LAMBDAS
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    val_share: float = Field(0.3, gt=0, lt=1)
    cache_features: bool = True
    seed: int = 0
    penalty_samples: Literal["batch", "concept"] = "batch"
    freeze: Literal["conv_bn", "features"] = "conv_bn"
    class_weighted: bool = True
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)


#: The project's earlier choices as one named variant: ``ClarcConfig(**PROJECT_SETUP)``.
PROJECT_SETUP: dict[str, Any] = {"pooling": "none", "penalty_samples": "concept", "freeze": "features",
                                 "class_weighted": False, "optimizer": "adam", "lr": 3e-3,
                                 "lambdas": PROJECT_LAMBDAS}


@dataclass(frozen=True)
class ConceptData:
    """Samples labelled for one concept: ``x`` ``[N, C, H, W]``, ``y`` ``[N]``, ``concept`` ``[N]`` bool."""

    x: torch.Tensor
    y: torch.Tensor
    concept: torch.Tensor

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.concept)):
            raise DataError(f"concept data: x, y and concept need the same length, got {len(self.x)}, {len(self.y)}, "
                            f"{len(self.concept)}")
        n_pos = int(self.concept.sum())
        if n_pos < 4 or len(self.concept) - n_pos < 4:
            raise DataError(f"concept data needs at least 4 samples with and 4 without the concept (got {n_pos} and "
                            f"{len(self.concept) - n_pos})")

    def split(self, val_share: float, seed: int) -> tuple["ConceptData", "ConceptData"]:
        """Stratified (fit, validation) split by the concept flag."""
        gen = torch.Generator().manual_seed(seed)
        val = torch.zeros(len(self.y), dtype=torch.bool)
        for flag in (True, False):
            idx = (self.concept == flag).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            val[idx[: max(2, int(round(val_share * len(idx))))]] = True
        return (ConceptData(self.x[~val], self.y[~val], self.concept[~val]),
                ConceptData(self.x[val], self.y[val], self.concept[val]))


def annotation_vector(n: int, k: int, mode: str, target_class: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``m`` ``[N, K]`` of Eq. 5: random +-1 per sample and logit, all ones, or one-hot on ``target_class``."""
    if mode == "random":
        return torch.randint(0, 2, (n, k), generator=generator).float() * 2 - 1
    if mode == "all":
        return torch.ones(n, k)
    if mode == "class":
        if target_class is None or not 0 <= target_class < k:
            raise ConfigError(f"class-specific RR-ClArC needs a target class in [0, {k}), got {target_class}")
        return F.one_hot(torch.full((n,), target_class), k).float()
    raise ConfigError(f"unknown RR-ClArC mode {mode!r}; choose random, all or class")


def rr_penalty(latent_grad: torch.Tensor, cav: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Paper 001, Eq. 5: ``mean_n (g_n . h)^2`` for ``g`` ``[N, C, ...]`` along ``lift_cav(h)``.

    For ``mean``/``max`` pooling the gradient is averaged over positions (the authors' code;
    a constant factor ``1 / (H W)`` against the summed derivative that TCAV uses).
    """
    g = pool_gradient(latent_grad, pooling)
    if latent_grad.dim() > 2 and pooling != "none":
        g = g / latent_grad.flatten(2).shape[2]
    return (g @ cav.to(g)).pow(2).mean()


def class_weights(y: torch.Tensor, k: int) -> torch.Tensor:
    """Cross-entropy weights ``[K]`` inversely proportional to each class's count in ``y`` (absent classes: 0).

    With ``reduction="mean"`` the weighted loss divides by the summed weights, so only the
    ratios matter: every present class contributes the same total weight.
    """
    counts = torch.bincount(y, minlength=k).float()[:k]
    return torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))


def with_projection(model: nn.Module, layer: str, cav: torch.Tensor, target: float, pooling: str = "mean") -> nn.Module:
    """A copy of ``model`` with a ``ClarcProjection`` after ``layer`` (P-ClArC); ``model`` is unchanged."""
    out = copy.deepcopy(model).eval()
    return insert_after(out, {layer: ClarcProjection(cav, target, pooling)}).eval()
