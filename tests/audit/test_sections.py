"""The prediction-only sections one by one: accuracy, subgroups, the headline, skipped sections."""

from __future__ import annotations

import numpy as np
import pytest

from hansgate.audit.compliance import ComplianceThresholds
from hansgate.audit.sections import (
    Skipped,
    headline_section,
    predictions_section,
    subgroups_section,
)

CLASSES = ["0", "1"]


def _onehot(pred: np.ndarray) -> np.ndarray:
    return np.eye(2)[pred]


def test_predictions_section_runs_each_model_once_and_scores_it():
    y = np.array([0, 1, 1, 0, 1])
    calls = {"before": 0, "after": 0}

    def model(name: str, pred: np.ndarray):
        def predict(x: np.ndarray) -> np.ndarray:
            calls[name] += 1
            assert x.shape == (5, 1, 2, 2)
            return _onehot(pred)
        return predict

    pred = predictions_section({"before": model("before", np.array([0, 0, 1, 0, 0])),
                                "after": model("after", y)}, np.zeros((5, 1, 2, 2), np.float32), y)
    assert calls == {"before": 1, "after": 1}
    assert pred.accuracy["before"].value == 0.6 and pred.accuracy["before"].n == 5
    assert pred.accuracy["after"].value == 1.0
    assert pred.predicted["before"].tolist() == [0, 0, 1, 0, 0]


def _shortcut_case(after_b: np.ndarray) -> tuple:
    """Site A: every prediction right; site B (40 samples): 'before' predicts class 0 for everything."""
    y = np.array([0, 1] * 40)
    site = np.array(["A"] * 40 + ["B"] * 40)
    before = np.concatenate([y[:40], np.zeros(40, dtype=int)])
    after = np.concatenate([y[:40], after_b])
    pred = predictions_section({"before": lambda x: _onehot(before), "after": lambda x: _onehot(after)},
                               np.zeros((80, 1, 1, 1), np.float32), y)
    sub = subgroups_section(CLASSES, y, pred, {"site": site}, ComplianceThresholds(min_samples=10))
    return sub, y


def test_headline_names_the_suppressed_group_and_whether_refinement_raised_it():
    y_b = np.array([0, 1] * 20)
    sub, _ = _shortcut_case(after_b=y_b)  # refinement fixes site B
    rows = headline_section(sub)
    assert [(r.attribute, r.value) for r in rows] == [("site", "B")]
    b = rows[0]
    assert b.n == 40 and b.accuracy_before == 0.5 and b.accuracy_after == 1.0
    assert b.macro_recall_before == 0.5 and b.macro_recall_after == 1.0 and b.raised
    assert b.classes_below_overall_before == ["1"] and b.classes_below_overall_after == []
    assert sub.order == ["before", "after"] and sub.as_dict()["delta"]["site"]["B"]["accuracy"] == 0.5
    # a refinement that changes nothing raises nothing
    sub_same, _ = _shortcut_case(after_b=np.zeros(40, dtype=int))
    (same,) = headline_section(sub_same)
    assert not same.raised and same.classes_below_overall_after == ["1"]


def test_headline_is_empty_without_a_comparison_model():
    y = np.array([0, 1] * 20)
    pred = predictions_section({"after": lambda x: _onehot(np.zeros(40, dtype=int))}, np.zeros((40, 1, 1, 1)), y)
    sub = subgroups_section(CLASSES, y, pred, {"site": np.array(["A", "B"] * 20)}, ComplianceThresholds())
    assert headline_section(sub) == [] and sub.order == ["after"]


def test_skipped_layout():
    assert Skipped("no torch model").as_dict() == {"status": "skipped", "reason": "no torch model"}


def test_calibration_section_judges_raw_and_tempered_probabilities():
    from types import SimpleNamespace

    from hansgate.audit.sections import CalibrationSection, calibration_section
    from hansgate.calibration import calibrated_probabilities
    from hansgate.manifest import CalibrationSpec

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3000, 4)) * 1.5
    y = np.array([rng.choice(4, p=row) for row in calibrated_probabilities(logits)])
    spec = CalibrationSpec(temperature=3.0, ece_before=0.2, ece_after=0.01, nll_before=1.0, nll_after=0.9,
                           samples=500, bins=10)
    section = calibration_section(SimpleNamespace(manifest=SimpleNamespace(calibration=spec)), logits * 3.0, y)
    assert isinstance(section, CalibrationSection)
    assert section.ece_calibrated < section.ece_raw / 3
    assert sum(b.count for b in section.reliability_raw) == sum(b.count for b in section.reliability_calibrated) == 3000
    assert len(section.reliability_raw) == 10 and section.as_dict()["status"] == "done"
    skipped = calibration_section(SimpleNamespace(manifest=SimpleNamespace(calibration=None)), logits, y)
    assert skipped.as_dict()["status"] == "skipped" and "temperature" in skipped.as_dict()["reason"]
    assert section.family == "temperature" and section.scales is None and section.label == "T = 3"


def test_calibration_section_uses_the_vector_scaling_the_bundle_records():
    """The section judges the calibration the gateway uses: per-class scales and biases, not the temperature."""
    from types import SimpleNamespace

    from hansgate.audit.sections import calibration_section
    from hansgate.calibration import calibrated_probabilities, expected_calibration_error
    from hansgate.manifest import CalibrationSpec

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2000, 3)) * 2
    scales, biases = [0.5, 1.0, 2.0], [0.3, 0.0, -0.3]
    y = np.array([rng.choice(3, p=row) for row in calibrated_probabilities(logits, scales=scales, biases=biases)])
    spec = CalibrationSpec(temperature=1.0, ece_before=0.2, ece_after=0.01, nll_before=1.0, nll_after=0.9,
                           samples=500, bins=10, family="vector", scales=scales, biases=biases, penalty=0.01)
    section = calibration_section(SimpleNamespace(manifest=SimpleNamespace(calibration=spec)), logits, y)
    expected = expected_calibration_error(calibrated_probabilities(logits, scales=scales, biases=biases), y, 10)
    assert section.ece_calibrated == pytest.approx(expected)
    assert section.ece_calibrated != pytest.approx(section.ece_raw)  # T = 1 alone would change nothing
    assert section.family == "vector" and section.scales == scales and section.label.startswith("vector scaling")
