"""Temperature and vector scaling against closed forms: the binary optimum, scale equivariance, ECE by hand,
vector scaling's reduction to temperature scaling, its gradient, and its cross-validated selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.errors import DataError
from hansgate.calibration import (
    PENALTIES,
    calibrated_probabilities,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    fit_vector_scaling,
)


@pytest.mark.parametrize("objective", ["nll", "brier"])
@pytest.mark.parametrize("z,p", [(2.0, 0.8), (5.0, 0.6), (0.5, 0.9)])
def test_binary_optimum_is_the_logit_of_the_hit_rate(z, p, objective):
    """Logits ``[z, 0]`` on every row, class 0 right on a share ``p``: the NLL optimum is at
    ``sigmoid(z / T) = p``, and the Brier-optimal constant probability is the hit rate too."""
    n = 1000
    logits = np.tile([z, 0.0], (n, 1))
    y = (np.arange(n) >= round(p * n)).astype(int)
    fitted = fit_temperature(logits, y, objective=objective).temperature
    assert fitted == pytest.approx(z / math.log(p / (1 - p)), rel=1e-4)


@pytest.mark.parametrize("objective,n,examples", [("nll", 200, 20), ("brier", 300, 10)])
def test_temperature_scales_with_the_logits(objective, n, examples):
    @settings(max_examples=examples, deadline=None)
    @given(seed=st.integers(0, 10_000), scale=st.floats(0.25, 4.0))
    def check(seed, scale):
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(n, 4)) * 2
        y = np.array([rng.choice(4, p=row) for row in calibrated_probabilities(logits)])
        t = fit_temperature(logits, y, objective=objective).temperature
        assert fit_temperature(logits * scale, y, objective=objective).temperature == pytest.approx(scale * t, rel=1e-3)

    check()


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


@pytest.mark.parametrize("objective", ["nll", "brier"])
def test_a_calibrated_set_keeps_temperature_one(objective):
    """Labels drawn from softmax(logits) itself: both objectives find T close to 1 (sampling noise only)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20000, 6)) * 2
    y = np.array([rng.choice(6, p=row) for row in calibrated_probabilities(logits)])
    assert fit_temperature(logits, y, objective=objective).temperature == pytest.approx(1.0, abs=0.05)


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


# -- vector scaling (Guo et al. 2017, Sec. 4.2) ----------------------------------------------------------

def _per_class_miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true calibration differs by class: labels drawn from ``softmax(w * z + b)``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 5)) * 2
    truth = calibrated_probabilities(logits, scales=[1.0, 1.0, 0.4, 1.0, 2.0], biases=[0.0, 0.8, 0.0, -0.8, 0.0])
    return logits, np.array([rng.choice(5, p=row) for row in truth])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.2, 5.0))
def test_equal_scales_and_zero_bias_are_temperature_scaling(seed, t):
    logits = np.random.default_rng(seed).normal(size=(30, 6)) * 3
    np.testing.assert_allclose(calibrated_probabilities(logits, scales=[1 / t] * 6, biases=[0.0] * 6),
                               calibrated_probabilities(logits, t), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("objective", ["nll", "brier"])
def test_vector_loss_gradient_matches_finite_differences(objective):
    from scipy.optimize import approx_fprime

    from hansgate.calibration import _vector_loss

    rng = np.random.default_rng(3)
    z, y = rng.normal(size=(40, 4)) * 2, rng.integers(0, 4, 40)
    params = rng.normal(size=8)
    numeric = approx_fprime(params, lambda p: _vector_loss(p, z, y, objective, 0.1, 0.7)[0], 1e-7)
    np.testing.assert_allclose(_vector_loss(params, z, y, objective, 0.1, 0.7)[1], numeric, atol=1e-6)


@pytest.mark.parametrize("objective", ["nll", "brier"])
def test_a_huge_penalty_is_temperature_scaling_and_biases_sum_to_zero(objective):
    """``lam -> inf`` pins ``w = 1/T, b = 0``; at any ``lam`` the optimum's biases sum to zero (a common shift
    of ``b`` leaves the softmax unchanged, so only the penalty acts on it)."""
    logits, y = _per_class_miscalibrated(800, 4)
    t = fit_temperature(logits, y, objective=objective).temperature
    stiff = fit_vector_scaling(logits, y, penalty=1e6, objective=objective)
    np.testing.assert_allclose(stiff.scales, 1 / t, rtol=1e-4)
    np.testing.assert_allclose(stiff.biases, 0.0, atol=1e-5)
    loose = fit_vector_scaling(logits, y, penalty=1e-3, objective=objective)
    assert abs(sum(loose.biases)) < 1e-5 and max(map(abs, loose.biases)) > 0.3


def test_vector_scaling_recovers_per_class_miscalibration_and_lowers_held_out_nll():
    logits, y = _per_class_miscalibrated(6000, 5)
    fit, test = slice(0, 3000), slice(3000, None)
    chosen = fit_calibration(logits[fit], y[fit])
    temperature = fit_temperature(logits[fit], y[fit])
    assert chosen.family == "vector" and chosen.cv_scores is not None
    assert chosen.cv_scores[f"vector@{chosen.penalty:g}"] < chosen.cv_scores["temperature"]

    def nll(c):
        return -np.log(c.probabilities(logits[test])[np.arange(3000), y[test]]).mean()

    assert nll(chosen) < nll(temperature) - 0.02
    # the relative scales and bias differences come back (softmax fixes the overall bias only up to a shift)
    w = np.asarray(chosen.scales)
    assert w[2] < 0.6 * w[0] and w[4] > 1.5 * w[0]
    assert chosen.biases[1] - chosen.biases[3] == pytest.approx(1.6, abs=0.3)


def test_a_single_temperature_world_keeps_temperature_scaling():
    """Few samples whose miscalibration is one temperature: cross-validation keeps the one-parameter family
    (on most seeds; where it does not, only the stiffest vector fit comes close)."""
    kept = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(80, 10)) * 2
        y = np.array([rng.choice(10, p=row) for row in calibrated_probabilities(logits, 2.0)])
        chosen = fit_calibration(logits, y)
        kept += chosen.family == "temperature"
        assert chosen.family == "temperature" or chosen.penalty == max(PENALTIES)
        assert chosen.temperature == pytest.approx(2.0, rel=0.5)
    assert kept >= 5
    assert fit_calibration(logits, y, family="temperature").cv_scores is None


def test_groups_keep_copies_in_one_fold():
    """Two exact copies of every sample: without groups a copy in another fold rewards memorising; with
    groups the cross-validated score is an honest held-out one (never better than the in-sample fit)."""
    logits, y = _per_class_miscalibrated(200, 7)
    twice, y2 = np.concatenate([logits, logits]), np.concatenate([y, y])
    grouped = fit_calibration(twice, y2, groups=np.tile(np.arange(200), 2), penalties=(1e-4,))
    loose = fit_calibration(twice, y2, penalties=(1e-4,))
    assert grouped.cv_scores["vector@0.0001"] > loose.cv_scores["vector@0.0001"]
    assert grouped.cv_scores["vector@0.0001"] > fit_vector_scaling(twice, y2, 1e-4).nll_after


def test_calibration_as_manifest_spec():
    logits, y = _per_class_miscalibrated(600, 8)
    spec = fit_calibration(logits, y, family="vector").as_spec()
    assert spec.family == "vector" and len(spec.scales) == len(spec.biases) == 5 and spec.objective == "nll"
    assert spec.penalty is not None and set(spec.cv_scores) == {f"vector@{lam:g}" for lam in PENALTIES}
    plain = fit_temperature(logits, y).as_spec()
    assert plain.family == "temperature" and plain.scales is None and plain.penalty is None


def test_bad_calibration_requests_are_one_clear_error():
    logits, y = np.zeros((10, 2)), np.arange(10) % 2
    with pytest.raises(DataError, match="family"):
        fit_calibration(logits, y, family="matrix")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="penalt"):
        fit_calibration(logits, y, penalties=(0.0,))
    with pytest.raises(DataError, match="penalty"):
        fit_vector_scaling(logits, y, penalty=float("inf"))
    with pytest.raises(DataError, match="groups"):
        fit_calibration(logits, y, groups=np.zeros(3))
    with pytest.raises(DataError, match="folds"):
        fit_calibration(logits, y, groups=np.zeros(10))
