"""Temperature scaling against closed forms: the binary optimum, scale equivariance, ECE by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.errors import DataError
from hansgate.calibration import (
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
)


@pytest.mark.parametrize("z,p", [(2.0, 0.8), (5.0, 0.6), (0.5, 0.9)])
def test_binary_optimum_is_the_logit_of_the_hit_rate(z, p):
    """Logits ``[z, 0]`` on every row, class 0 right on a share ``p``: NLL optimum at ``sigmoid(z / T) = p``."""
    n = 1000
    logits = np.tile([z, 0.0], (n, 1))
    y = (np.arange(n) >= round(p * n)).astype(int)
    fitted = fit_temperature(logits, y).temperature
    assert fitted == pytest.approx(z / math.log(p / (1 - p)), rel=1e-4)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.25, 4.0))
def test_temperature_scales_with_the_logits(seed, scale):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(200, 4)) * 2
    y = np.array([rng.choice(4, p=row) for row in calibrated_probabilities(logits)])
    t = fit_temperature(logits, y).temperature
    assert fit_temperature(logits * scale, y).temperature == pytest.approx(scale * t, rel=1e-3)


def test_overconfident_model_is_cooled_and_ece_drops():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 1.5
    y = np.array([rng.choice(5, p=row) for row in calibrated_probabilities(logits)])
    cal = fit_temperature(logits * 3.0, y)
    assert cal.temperature == pytest.approx(3.0, rel=0.1)
    assert cal.ece_after < cal.ece_before / 3 and cal.nll_after < cal.nll_before


def test_ece_by_hand():
    """Two bins: confidences 0.9 (right, wrong) and 0.6 (right): |0.5 - 0.9| * 2/3 + |1 - 0.6| * 1/3."""
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    y = np.array([0, 1, 1])
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)


def test_bad_input_is_one_clear_error():
    with pytest.raises(DataError, match="non-finite"):
        fit_temperature(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    with pytest.raises(DataError, match="labels"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(DataError, match="N >= 2"):
        fit_temperature(np.zeros((1, 2)), np.array([0]))


@pytest.mark.parametrize("z,p", [(2.0, 0.8), (5.0, 0.6), (0.5, 0.9)])
def test_brier_binary_optimum_is_the_logit_of_the_hit_rate(z, p):
    """Constant logits ``[z, 0]``: the Brier-optimal constant probability is the hit rate too."""
    n = 1000
    logits = np.tile([z, 0.0], (n, 1))
    y = (np.arange(n) >= round(p * n)).astype(int)
    fitted = fit_temperature(logits, y, objective="brier").temperature
    assert fitted == pytest.approx(z / math.log(p / (1 - p)), rel=1e-4)


@pytest.mark.parametrize("objective", ["nll", "brier"])
def test_a_calibrated_set_keeps_temperature_one(objective):
    """Labels drawn from softmax(logits) itself: both objectives find T close to 1 (sampling noise only)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20000, 6)) * 2
    y = np.array([rng.choice(6, p=row) for row in calibrated_probabilities(logits)])
    assert fit_temperature(logits, y, objective=objective).temperature == pytest.approx(1.0, abs=0.05)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.25, 4.0))
def test_brier_temperature_scales_with_the_logits(seed, scale):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(300, 4)) * 2
    y = np.array([rng.choice(4, p=row) for row in calibrated_probabilities(logits)])
    t = fit_temperature(logits, y, objective="brier").temperature
    assert fit_temperature(logits * scale, y, objective="brier").temperature == pytest.approx(scale * t, rel=1e-3)


def test_brier_is_less_moved_by_a_few_confident_mistakes():
    """A calibrated set plus 2 % rows confidently wrong (logit gap 12): NLL heats far more than Brier."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5000, 5)) * 2
    y = np.array([rng.choice(5, p=row) for row in calibrated_probabilities(logits)])
    wrong = rng.random(len(y)) < 0.02
    logits[wrong] = 0.0
    logits[wrong, (y[wrong] + 1) % 5] = 12.0
    t_nll = fit_temperature(logits, y).temperature
    t_brier = fit_temperature(logits, y, objective="brier").temperature
    assert t_nll > 1.2 and abs(t_brier - 1.0) < abs(t_nll - 1.0) / 2


def test_unknown_objective_is_one_clear_error():
    with pytest.raises(DataError, match="objective"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1, 0]), objective="ece")  # type: ignore[arg-type]
