"""EGEM's pruning factors, the per-layer lambda search and the triangular schedule (paper 000).

What: the soft-pruning factor of Eq. 5, ``c = E[a^2] / (E[a^2] + lambda)``; the search
for each layer's ``lambda`` given a target mean factor ``tau_l``; and the triangular
schedule of Sec. 4.4 that spreads the one refinement parameter ``alpha`` over the L
refined layers.

Why: the paper optimises one parameter (``alpha``) instead of one ``lambda`` per layer;
``lambda_l`` is then set so that layer ``l``'s average pruning factor meets ``tau_l``
("can be easily implemented as exponential search").

Choices, each tested (tests/refinement/test_schedule.py, test_egem_oracle.py):

- Lambda search, ``rule="grid"`` (default, the authors' code): start at ``5e-7`` and
  double while the mean factor is still ``>= tau``; return the first grid value where it
  falls below. ``rule="bisect"`` (the project's earlier default) refines the bracket by
  geometric bisection to the largest lambda whose mean factor is still ``>= tau``
  (Sec. 4.4 read literally: "at least tau_l").
- Schedule, ``"deep"`` (default, the authors' code and the text "pruning strength
  increases with the layer index"): ``tau_l = 1 - (1 - alpha) * l / (L - 1)`` for
  ``l = 0 .. L-1``: the first refined layer gets 1 (prunes only dead units), the deepest
  ``alpha``; one refined layer gets ``tau = 1``. ``"shallow"`` is the printed formula
  (``alpha`` at ``l = 1``; one layer gets ``alpha``). Every ``tau`` lies in
  ``[alpha, 1]`` by construction (clamped, the end points set exactly), so rounding can
  never produce a value above 1.
"""

from __future__ import annotations

from typing import Literal

import torch

from hansgate.errors import ConfigError

__all__ = ["ALPHA_GRID", "LAMBDA_START", "egem_factors", "mean_factor", "search_lambda", "triangular_schedule"]

#: Supp. F.3 (its "0.01, 0.01" read as "0.01, 0.1"), strongest first.
ALPHA_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: First lambda of the exponential search (authors' code).
LAMBDA_START = 5e-7
_LAMBDA_MAX = 1e30


def egem_factors(second_moment: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 5: ``c = m2 / (m2 + lambda)`` per unit; ``lambda = 0`` gives ones (the identity).

    ``second_moment``: ``[D]`` non-negative (``E[a^2]``, or PCA eigenvalues ``E[h^2]``).
    """
    if lam == 0:
        return torch.ones_like(second_moment)
    return second_moment / (second_moment + lam)


def mean_factor(second_moment: torch.Tensor, lam: float) -> float:
    """Mean of ``egem_factors`` over units: the layer's average pruning factor (Sec. 4.4)."""
    return egem_factors(second_moment, lam).mean().item()


def search_lambda(second_moment: torch.Tensor, tau: float, start: float = LAMBDA_START,
                  rule: Literal["grid", "bisect"] = "grid", steps: int = 48) -> float:
    """Lambda for a target mean factor ``tau`` (Sec. 4.4's exponential search).

    ``rule="grid"``: the first of ``start * 2^k`` whose mean factor is below ``tau``
    (``start`` when it already is, e.g. for ``tau = 1``). ``rule="bisect"``: the largest
    lambda whose mean factor is still at least ``tau``, to ``steps`` bisections
    (``start`` when the target is missed there already).
    """
    if not 0 < tau <= 1:
        raise ConfigError(f"target mean factor tau must lie in (0, 1], got {tau}")
    if rule not in ("grid", "bisect"):
        raise ConfigError(f"unknown lambda search rule {rule!r}; choose 'grid' or 'bisect'")
    lam = start
    while mean_factor(second_moment, lam) >= tau:
        if lam * 2 > _LAMBDA_MAX:  # every unit has enormous moments relative to tau; cannot prune further
            return lam
        lam *= 2
    if rule == "grid" or lam == start:
        return lam
    lo, hi = lam / 2, lam
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        if mean_factor(second_moment, mid) >= tau:
            lo = mid
        else:
            hi = mid
    return lo


def triangular_schedule(alpha: float, n_layers: int, schedule: Literal["deep", "shallow"] = "deep") -> list[float]:
    """Target mean factors ``tau_l`` per refined layer, linear between ``alpha`` and 1 (Sec. 4.4).

    Every value lies in ``[alpha, 1]``; ``deep`` starts at exactly 1 and ends at exactly
    ``alpha`` (``shallow`` the reverse); one layer gets 1 (``deep``) or ``alpha`` (``shallow``).
    """
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha must lie in (0, 1], got {alpha}")
    if n_layers < 1:
        raise ConfigError(f"need at least one refined layer, got {n_layers}")
    if schedule not in ("deep", "shallow"):
        raise ConfigError(f"unknown schedule {schedule!r}; choose 'deep' or 'shallow'")
    if n_layers == 1:
        return [1.0 if schedule == "deep" else alpha]
    last = n_layers - 1
    deep = [1.0] + [min(1.0, max(alpha, 1.0 - (1.0 - alpha) * i / last)) for i in range(1, last)] + [alpha]
    return deep if schedule == "deep" else deep[::-1]
