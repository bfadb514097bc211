"""How a refinement method picks its hyper-parameter: the ``Selection`` protocol and its two rules.

Every method evaluates candidates and keeps the evidence; the bundle's manifest stores
``selection.as_dict()`` beside the hyper-parameters. Two rules exist:

- ``SlackSelection`` — the slack rule of paper 000, Sec. 4.4: candidates ordered from
  the strongest refinement to the weakest; the strongest whose validation accuracy is
  at least ``(1 - slack)`` times the original model's (a relative slack, as the
  authors' code does), the weakest if none qualifies.
- ``RuleSelection`` — any other stated rule with one score per candidate, the best
  of which wins: RR-ClArC's highest balanced accuracy on held-out concept data
  (paper 001, Sec. 4.4) and the XS methods' lowest cross-entropy on validation data
  whose spurious signal is permuted (paper 002); ``select_best`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from hansgate.errors import ConfigError

__all__ = ["Candidate", "Selection", "SlackSelection", "RuleSelection", "select_by_slack", "select_best",
           "validation_split"]


@dataclass(frozen=True)
class Candidate:
    """One evaluated hyper-parameter setting: its parameters and its accuracy on validation data."""

    params: dict[str, Any]
    val_acc: float


@runtime_checkable
class Selection(Protocol):
    """What every method's choice exposes: the winner, the table it came from, and a JSON form."""

    chosen: Candidate
    candidates: list[Candidate]

    @property
    def rule(self) -> str: ...

    def as_dict(self) -> dict[str, Any]: ...


@dataclass
class SlackSelection:
    """The outcome of the slack rule, with the whole table as evidence."""

    chosen: Candidate
    original_val_acc: float
    slack: float
    threshold: float
    candidates: list[Candidate] = field(default_factory=list)
    qualified: bool = True

    @property
    def rule(self) -> str:
        return "slack"

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.params,
            "chosen_val_acc": self.chosen.val_acc,
            "original_val_acc": self.original_val_acc,
            "slack": self.slack,
            "threshold": self.threshold,
            "qualified": self.qualified,
            "candidates": [{"params": c.params, "val_acc": c.val_acc} for c in self.candidates],
        }


@dataclass
class RuleSelection:
    """A choice by a stated rule (``rule``) over one score per candidate.

    ``scores`` (name ``score_name``) decided; ``None`` where a candidate has no score
    (a single fixed setting). ``details`` holds further per-candidate measurements for
    the record (e.g. seconds); ``original_val_acc`` the unrefined model's, when known.
    """

    chosen: Candidate
    candidates: list[Candidate]
    rule: str
    score_name: str = "score"
    scores: list[float | None] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    original_val_acc: float | None = None

    def as_dict(self) -> dict[str, Any]:
        scores = self.scores or [None] * len(self.candidates)
        details = self.details or [{}] * len(self.candidates)
        out: dict[str, Any] = {"rule": self.rule, "chosen": self.chosen.params, "chosen_val_acc": self.chosen.val_acc}
        if self.original_val_acc is not None:
            out["original_val_acc"] = self.original_val_acc
        out["candidates"] = [{"params": c.params, "val_acc": c.val_acc, **d,
                              **({self.score_name: s} if s is not None else {})}
                             for c, s, d in zip(self.candidates, scores, details)]
        return out


def select_by_slack(candidates: list[Candidate], original_val_acc: float, slack: float) -> SlackSelection:
    """Strongest candidate with ``val_acc >= (1 - slack) * original_val_acc`` (strongest first)."""
    if not candidates:
        raise ConfigError("no hyper-parameter candidates to select from")
    if not 0 <= slack < 1:
        raise ConfigError(f"slack must lie in [0, 1), got {slack}")
    threshold = (1 - slack) * original_val_acc
    for cand in candidates:
        if cand.val_acc >= threshold:
            return SlackSelection(cand, original_val_acc, slack, threshold, list(candidates))
    return SlackSelection(candidates[-1], original_val_acc, slack, threshold, list(candidates), qualified=False)


def select_best(candidates: list[Candidate], scores: list[float | None], rule: str, *,
                best: Literal["min", "max"], score_name: str = "score",
                details: list[dict[str, Any]] | None = None, original_val_acc: float | None = None) -> RuleSelection:
    """The candidate with the lowest (``best="min"``) or highest score; ties go to the earlier candidate.

    Candidates without a score (``None``) win only when no candidate has one (a fixed setting).
    """
    if not candidates or len(scores) != len(candidates):
        raise ConfigError(f"need one score per candidate, got {len(candidates)} candidates and {len(scores)} scores")
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if scored:
        sign = 1.0 if best == "min" else -1.0
        idx = min(scored, key=lambda si: (sign * si[0], si[1]))[1]
    else:
        idx = 0
    return RuleSelection(candidates[idx], list(candidates), rule, score_name, list(scores), list(details or []),
                         original_val_acc)


def validation_split(n: int, val_share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, validation); validation gets ``ceil(val_share * n)`` samples (Supp. F.3)."""
    if n < 2:
        raise ConfigError(f"need at least 2 refinement samples to hold out validation data, got {n}")
    n_val = min(n - 1, max(1, int(-(-val_share * n // 1))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]
