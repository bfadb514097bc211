"""The slack rule of paper 000, Sec. 4.4, shared by every refinement method.

Each method offers hyper-parameter candidates ordered from the strongest refinement
to the weakest; the rule picks the strongest whose validation accuracy is at least
``(1 - slack)`` times the original model's (a relative slack, as the authors' code
does), and the weakest candidate if none qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hansgate.errors import ConfigError

__all__ = ["Candidate", "SlackSelection", "select_by_slack", "validation_split"]


@dataclass(frozen=True)
class Candidate:
    """One evaluated hyper-parameter setting."""

    params: dict[str, Any]
    val_acc: float


@dataclass
class SlackSelection:
    """The outcome of the rule, with the whole table as evidence."""

    chosen: Candidate
    original_val_acc: float
    slack: float
    threshold: float
    candidates: list[Candidate] = field(default_factory=list)
    qualified: bool = True

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


def validation_split(n: int, val_share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, validation); validation gets ``ceil(val_share * n)`` samples (Supp. F.3)."""
    if n < 2:
        raise ConfigError(f"need at least 2 refinement samples to hold out validation data, got {n}")
    n_val = min(n - 1, max(1, int(-(-val_share * n // 1))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]
