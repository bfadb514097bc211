"""TCAV with its significance test and concept rankings (paper 001 Eq. 9; paper 003, Appendix B).

- **Latent gradients.** For target samples ``x`` and classes ``k``, ``G[n, k] =
  sum_{spatial} d f_k / d a`` ``[N, K, C]``: the gradient of each logit w.r.t. the
  concept layer's output, summed over positions. With the CAV acting as the same
  offset at every position (``audit.cav``), the directional derivative of logit
  ``k`` along ``h`` is ``G[n, k] . h`` — so gradients are computed once and every CAV
  (the concept's and all random ones) costs a matrix product.
- **TCAV** (Eq. 9): the share of samples whose directional derivative is positive;
  0.5 means the concept has no consistent influence on the class.
- **Significance test** (Kim et al. 2018, as tensorflow/tcav runs it; captum ships
  none): ``runs`` CAVs are fitted on random halves (``sample_share``) of the concept
  data; ``runs`` *random* CAVs are fitted on the same subsamples with the concept
  labels shuffled (random concept sets of the same sizes). A two-sided Student
  t-test (``scipy.stats.ttest_ind``) compares the two lists of TCAV scores; the
  concept is significant at ``alpha`` (default 0.05). Degenerate lists (no variance
  in either) get ``p = 1`` unless their means differ, then ``p = 0``.
- **Ranking** for one class (paper 003, Appendix B): every concept's result, ordered
  significant first, then by the mean TCAV score (descending).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.concepts.cav import CAV_KINDS, ConceptActivationVector, pooled_activations
from hansgate.concepts.gradients import (
    directional_derivatives,
    latent_gradients,
    tcav_score,
)
from hansgate.errors import ConfigError, DataError

__all__ = [
    "TcavConfig",
    "TcavResult",
    "latent_gradients",
    "directional_derivatives",
    "tcav_score",
    "tcav_test",
    "tcav_for_class",
    "ConceptRanking",
]


class TcavConfig(BaseModel):
    """Options of the significance test.

    ``runs`` repetitions (paper 003 uses 100), ``sample_share`` of each side drawn per run,
    ``alpha`` significance level, ``cav_kind``/``pooling`` of the CAVs, ``seed``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: int = Field(20, ge=2, le=1000)
    sample_share: float = Field(0.5, gt=0.0, le=1.0)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    cav_kind: str = "signal"
    pooling: str = "mean"
    seed: int = 0


@dataclass
class TcavResult:
    """One concept's TCAV for one class, with its evidence."""

    concept: str
    class_index: int
    score: float  # TCAV of the CAV fitted on all concept data
    mean: float
    std: float
    random_mean: float
    random_std: float
    t_statistic: float
    p_value: float
    significant: bool
    verdict: str
    scores: list[float] = field(default_factory=list)
    random_scores: list[float] = field(default_factory=list)
    runs: int = 0
    n_target: int = 0
    alpha: float = 0.05
    cav_kind: str = "signal"
    seed: int = 0
    test: str = "two-sided Student t-test (scipy.stats.ttest_ind) of concept vs random-concept TCAV scores"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ttest(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if np.std(a) == 0 and np.std(b) == 0:  # scipy would return nan
        return (0.0, 1.0) if np.mean(a) == np.mean(b) else (math.copysign(math.inf, np.mean(a) - np.mean(b)), 0.0)
    with warnings.catch_warnings():
        # TCAV scores are multiples of 1/N: lists that are almost constant make scipy warn about
        # precision loss in the variance; the test result is still what scipy computes
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = stats.ttest_ind(a, b)  # two-sided, equal variances (as tensorflow/tcav)
    return float(res.statistic), float(res.pvalue)


def tcav_test(grads: torch.Tensor, acts: torch.Tensor, concept: torch.Tensor, config: TcavConfig | None = None,
              name: str = "concept", class_index: int = 0) -> TcavResult:
    """Significance test of one concept for one class from precomputed pieces.

    ``grads`` ``[N, C]``: latent gradients of the class on the target samples;
    ``acts`` ``[M, C]``: pooled activations of the concept data; ``concept`` ``[M]`` bool.
    """
    cfg = config or TcavConfig()
    if cfg.cav_kind not in CAV_KINDS:
        raise ConfigError(f"unknown CAV kind {cfg.cav_kind!r}; choose from {list(CAV_KINDS)}")
    t = concept.bool().reshape(-1)
    if grads.dim() != 2 or acts.dim() != 2 or grads.shape[1] != acts.shape[1] or len(acts) != len(t):
        raise DataError(f"tcav_test needs grads [N, C], acts [M, C], concept [M]; got {tuple(grads.shape)}, "
                        f"{tuple(acts.shape)}, {tuple(t.shape)}")
    pos, neg = t.nonzero().flatten(), (~t).nonzero().flatten()
    n_pos, n_neg = max(2, int(round(cfg.sample_share * len(pos)))), max(2, int(round(cfg.sample_share * len(neg))))
    if len(pos) < 2 or len(neg) < 2:
        raise DataError(f"TCAV needs at least 2 samples with and 2 without the concept (got {len(pos)}, {len(neg)})")
    gen = torch.Generator().manual_seed(cfg.seed)

    def score_of(a: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
        cav = ConceptActivationVector(cfg.cav_kind, seed=seed).fit(a, labels).cav_
        return tcav_score(directional_derivatives(grads, cav))

    full = score_of(acts, t, cfg.seed)
    scores, random_scores = [], []
    for r in range(cfg.runs):
        idx = torch.cat([pos[torch.randperm(len(pos), generator=gen)[:n_pos]],
                         neg[torch.randperm(len(neg), generator=gen)[:n_neg]]])
        labels = t[idx]
        scores.append(score_of(acts[idx], labels, cfg.seed + r))
        shuffled = labels[torch.randperm(len(labels), generator=gen)]  # a random concept set of the same size
        random_scores.append(score_of(acts[idx], shuffled, cfg.seed + r))
    s, rs = np.array(scores), np.array(random_scores)
    stat, p = _ttest(s, rs)
    significant = bool(p < cfg.alpha)
    if not significant:
        verdict = "not significant"
    else:
        verdict = "positive influence" if s.mean() > rs.mean() else "negative influence"
    return TcavResult(concept=name, class_index=class_index, score=full, mean=float(s.mean()), std=float(s.std()),
                      random_mean=float(rs.mean()), random_std=float(rs.std()), t_statistic=stat, p_value=p,
                      significant=significant, verdict=verdict, scores=scores, random_scores=random_scores,
                      runs=cfg.runs, n_target=len(grads), alpha=cfg.alpha, cav_kind=cfg.cav_kind, seed=cfg.seed)


def _concept_data(x_concept: torch.Tensor, x_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x_concept) < 2 or len(x_other) < 2:
        raise DataError("a concept needs at least 2 samples with and 2 without it")
    return torch.cat([x_concept, x_other]), torch.cat([torch.ones(len(x_concept), dtype=torch.bool),
                                                       torch.zeros(len(x_other), dtype=torch.bool)])


def tcav_for_class(model: nn.Module, layer: str, x_target: torch.Tensor, class_index: int, x_concept: torch.Tensor,
                   x_other: torch.Tensor, config: TcavConfig | None = None, name: str = "concept") -> TcavResult:
    """TCAV of ``class_index`` on ``x_target`` for the concept shown by ``x_concept`` vs ``x_other``."""
    cfg = config or TcavConfig()
    x, t = _concept_data(x_concept, x_other)
    acts = pooled_activations(model, layer, x, cfg.pooling)
    grads = latent_gradients(model, layer, x_target, [class_index], cfg.pooling)[:, 0]
    return tcav_test(grads, acts, t, cfg, name=name, class_index=class_index)


class ConceptRanking:
    """Concept ranking for one class (paper 003, Appendix B).

    ``fit(model, layer, x_class, class_index, concepts)`` with ``concepts = {name:
    (x_with, x_without)}``; learned: ``results_`` ``{name: TcavResult}`` and ``ranking_``
    (names, significant first, then by mean TCAV score, descending).
    """

    def __init__(self, config: TcavConfig | None = None) -> None:
        self.config = config or TcavConfig()

    def fit(self, model: nn.Module, layer: str, x_class: torch.Tensor, class_index: int,
            concepts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> "ConceptRanking":
        if not concepts:
            raise DataError("no concepts to rank")
        cfg = self.config
        grads = latent_gradients(model, layer, x_class, [class_index], cfg.pooling)[:, 0]
        self.results_: dict[str, TcavResult] = {}
        for name, (x_with, x_without) in concepts.items():
            x, t = _concept_data(x_with, x_without)
            acts = pooled_activations(model, layer, x, cfg.pooling)
            self.results_[name] = tcav_test(grads, acts, t, cfg, name=name, class_index=class_index)
        self.ranking_ = sorted(self.results_, key=lambda n: (not self.results_[n].significant, -self.results_[n].mean))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"ranking": self.ranking_, "results": {n: r.as_dict() for n, r in self.results_.items()}}
