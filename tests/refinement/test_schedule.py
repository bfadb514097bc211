"""The triangular schedule and the lambda search (paper 000, Sec. 4.4; IMPLEMENTATION-NOTES)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.errors import ConfigError
from hansgate.refinement.schedule import (
    ALPHA_GRID,
    LAMBDA_START,
    egem_factors,
    mean_factor,
    search_lambda,
    triangular_schedule,
)

_alphas = st.one_of(st.sampled_from(ALPHA_GRID), st.floats(1e-9, 1.0, exclude_min=False))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), _alphas, st.sampled_from(["deep", "shallow"]))
def test_every_tau_lies_in_alpha_to_one(n_layers, alpha, schedule):
    taus = triangular_schedule(alpha, n_layers, schedule)
    assert len(taus) == n_layers
    assert all(0 < t <= 1 for t in taus) and all(alpha <= t for t in taus)
    deep = taus if schedule == "deep" else taus[::-1]
    assert all(a >= b for a, b in zip(deep, deep[1:]))  # pruning strength grows with depth
    if n_layers == 1:
        assert taus == [1.0 if schedule == "deep" else alpha]
    else:
        assert deep[0] == 1.0 and deep[-1] == alpha
    for i, t in enumerate(deep if n_layers > 1 else []):  # the authors' tau_l = 1 - (1 - alpha) l / (L - 1)
        assert t == pytest.approx(1 - (1 - alpha) * i / (n_layers - 1), rel=1e-12, abs=1e-15)


def test_rounding_cannot_push_tau_above_one():
    assert 1 - 0.8 * 0 / 3 == 1.0 and 0.2 + 3 * (1 - 0.2) / 3 > 1.0  # what the old formula computed
    assert triangular_schedule(0.2, 4) == [1.0, pytest.approx(0.7333333333), pytest.approx(0.4666666667), 0.2]
    assert max(triangular_schedule(0.2, 4, "shallow")) == 1.0


def test_single_refined_layer_gets_tau_one():
    assert triangular_schedule(0.01, 1) == [1.0]
    assert triangular_schedule(0.01, 1, "shallow") == [0.01]


@pytest.mark.parametrize("alpha,n", [(0.0, 3), (1.5, 3), (0.5, 0)])
def test_schedule_rejects_bad_arguments(alpha, n):
    with pytest.raises(ConfigError):
        triangular_schedule(alpha, n)


def test_factors_closed_form_and_identity_at_zero():
    m2 = torch.tensor([0.0, 1.0, 4.0])
    assert torch.allclose(egem_factors(m2, 2.0), torch.tensor([0.0, 1 / 3, 4 / 6]))
    assert torch.equal(egem_factors(m2, 0.0), torch.ones(3))


def _reference_grid(m2: torch.Tensor, tau: float) -> float:
    lam = 5e-7
    while (m2 / (m2 + lam)).mean().item() >= tau:
        lam = lam * 2
    return lam


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=30), st.floats(0.01, 1.0))
def test_grid_rule_is_the_first_doubling_below_tau(values, tau):
    m2 = torch.tensor(values, dtype=torch.float64)
    lam = search_lambda(m2, tau)
    assert lam == _reference_grid(m2, tau)
    assert mean_factor(m2, lam) < tau
    assert lam == LAMBDA_START or mean_factor(m2, lam / 2) >= tau


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=30), st.floats(0.01, 0.99))
def test_bisect_rule_is_the_largest_lambda_meeting_tau(values, tau):
    m2 = torch.tensor(values, dtype=torch.float64)
    lam = search_lambda(m2, tau, rule="bisect")
    if mean_factor(m2, LAMBDA_START) < tau:  # already below at the start: start is returned
        assert lam == LAMBDA_START
        return
    assert mean_factor(m2, lam) >= tau
    assert mean_factor(m2, lam * 1.001) < tau + 1e-3
    assert lam < search_lambda(m2, tau) <= 2 * lam * 1.0001  # the grid value lies one doubling above at most


def test_tau_one_prunes_only_dead_units():
    m2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    for rule in ("grid", "bisect"):
        c = egem_factors(m2, search_lambda(m2, 1.0, rule=rule))
        assert c[0] == 0 and torch.all(c[1:] > 0.999)


def test_search_rejects_bad_targets_and_rules():
    m2 = torch.ones(3, dtype=torch.float64)
    for tau in (0.0, 1.0000000000000002, -1.0):
        with pytest.raises(ConfigError):
            search_lambda(m2, tau)
    with pytest.raises(ConfigError):
        search_lambda(m2, 0.5, rule="newton")  # type: ignore[arg-type]
