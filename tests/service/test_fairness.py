"""Live fairness arithmetic: attribute parsing, per-subgroup counts against a direct tally, the four-fifths rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.errors import BundleError, RequestError
from hansgate.manifest import CalibrationSpec
from hansgate.service.fairness import (
    Calibrator,
    FairnessThresholds,
    estimated_table,
    fairness_counts,
    parse_attribute_header,
    row_attributes,
    selection_table,
)

DECLARED = {"site": ["A", "B"], "stroke": ["thin", "thick"]}
CLASSES = ["0", "1", "2"]


def test_header_parses_declared_pairs_only():
    assert parse_attribute_header("site=B, stroke=thin", DECLARED) == {"site": "B", "stroke": "thin"}
    assert parse_attribute_header("", DECLARED) == {}
    for bad, reason in [("site=C", "unknown_value"), ("sex=f", "unknown_attribute"), ("site", "bad_request"),
                        ("site=A,site=B", "bad_request"), ("site=" + "A" * 5000, "bad_request"),
                        ('site="A"\n', "unknown_value")]:
        with pytest.raises(RequestError) as err:
            parse_attribute_header(bad, DECLARED)
        assert err.value.reason == reason


def test_row_attributes_one_for_all_or_one_per_row():
    assert row_attributes({"site": "A"}, 2, DECLARED) == [{"site": "A"}, {"site": "A"}]
    assert row_attributes([{"site": "A"}, {}], 2, DECLARED) == [{"site": "A"}, {}]
    assert row_attributes(None, 1, DECLARED) == [{}]
    with pytest.raises(RequestError, match="3 objects for 2 rows"):
        row_attributes([{}, {}, {}], 2, DECLARED)
    with pytest.raises(RequestError) as err:
        row_attributes({"site": 1}, 1, DECLARED)
    assert err.value.reason == "unknown_value"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40))
def test_counts_equal_a_direct_tally(seed, n):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    present = rng.random((n, 1)) > 0.5
    attrs = [{"site": str(rng.choice(["A", "B"]))} if rng.random() > 0.2 else {} for _ in range(n)]
    counts = fairness_counts(pred, probs, present, attrs, CLASSES, ["mark"])
    for v in ("A", "B"):
        rows = [i for i, a in enumerate(attrs) if a.get("site") == v]
        assert counts.rows.get(("site", v), 0) == len(rows)
        if not rows:
            continue
        assert counts.present[("site", v, "mark")] == int(present[rows, 0].sum())
        for k, cls in enumerate(CLASSES):
            assert counts.predicted.get(("site", v, cls), 0) == sum(pred[i] == k for i in rows)
            assert counts.expected_tp[("site", v, cls)] == pytest.approx(sum(probs[i, k] for i in rows if pred[i] == k))
            assert counts.expected_fn[("site", v, cls)] == pytest.approx(sum(probs[i, k] for i in rows if pred[i] != k))


def test_selection_ratio_and_the_guarded_four_fifths_flag():
    declared = {"site": ["A", "B"]}
    predicted = {("site", "A", "1"): 50, ("site", "B", "1"): 30}
    table = selection_table(predicted, {("site", "A"): 100, ("site", "B"): 100}, declared, ["1"])
    b = next(e for e in table if e["value"] == "B")
    assert b["rate"] == 0.3 and b["ratio_to_max"] == pytest.approx(0.6) and b["flags"] == ["adverse_impact"]
    a = next(e for e in table if e["value"] == "A")
    assert a["ratio_to_max"] == 1.0 and a["flags"] == []
    guarded = selection_table(predicted, {("site", "A"): 100, ("site", "B"): 29}, declared, ["1"],
                              FairnessThresholds(min_samples=30))
    assert all("adverse_impact" not in e["flags"] for e in guarded)
    assert next(e for e in guarded if e["value"] == "B")["flags"] == ["few_samples"]


def test_estimate_is_untrusted_where_the_shortcut_is_present():
    declared = {"site": ["A", "B"]}
    rows = {("site", "A"): 100, ("site", "B"): 100}
    tp_hat = {("site", "A", "1"): 45.0, ("site", "B", "1"): 40.0}
    fn_hat = {("site", "A", "1"): 5.0, ("site", "B", "1"): 10.0}
    present = {("site", "A", "mark"): 2, ("site", "B", "mark"): 60}
    table = estimated_table(tp_hat, fn_hat, {("site", "A", "1"): (9, 10)}, present, rows, declared, ["1"],
                            ["mark"], calibrated=True)
    a, b = table
    assert (a["estimated_recall"], a["realized_recall"], a["labelled"], a["trusted"]) == (0.9, 0.9, 10, True)
    assert (b["estimated_recall"], b["realized_recall"], b["labelled"], b["trusted"]) == (0.8, None, 0, False)
    uncalibrated = estimated_table(tp_hat, fn_hat, {}, {}, rows, declared, ["1"], [], calibrated=False)
    assert all(e["estimated_recall"] is None and not e["trusted"] for e in uncalibrated)


_SPEC = dict(temperature=2.0, ece_before=0.1, ece_after=0.05, nll_before=1.0, nll_after=0.9, samples=50, bins=10)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.2, 5.0))
def test_calibrator_matches_the_offline_calibration(seed, t):
    """The gateway's numpy map equals ``hansgate.calibration`` for both families (temperature as equal scales)."""
    from hansgate.calibration import calibrated_probabilities

    z = np.random.default_rng(seed).normal(size=(20, 3)).astype(np.float32) * 4
    plain = Calibrator(CalibrationSpec(**{**_SPEC, "temperature": t}), 3)
    np.testing.assert_allclose(plain(z), calibrated_probabilities(z, t), rtol=1e-10, atol=1e-14)
    vector = CalibrationSpec(**_SPEC, family="vector", scales=[t, 1.0, 0.5], biases=[0.2, 0.0, -0.2])
    np.testing.assert_allclose(Calibrator(vector, 3)(z), calibrated_probabilities(z, scales=vector.scales,
                                                                                  biases=vector.biases),
                               rtol=1e-10, atol=1e-14)


def test_calibrator_refuses_parameters_that_do_not_fit_the_classes():
    vector = CalibrationSpec(**_SPEC, family="vector", scales=[1.0, 1.0], biases=[0.0, 0.0])
    with pytest.raises(BundleError, match="2 scales and 2 biases for 3 classes"):
        Calibrator(vector, 3)
    # bypassing the manifest's validation (as a corrupted in-memory spec would) still fails here
    broken = CalibrationSpec.model_construct(**_SPEC, family="vector", scales=[1.0, float("nan"), 1.0],
                                             biases=[0.0, 0.0, 0.0])
    with pytest.raises(BundleError, match="finite"):
        Calibrator(broken, 3)
