"""hansgate.audit.compliance: Wilson intervals against closed forms, tables and flags from counts."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansgate.audit.compliance import (
    ALL,
    ComplianceThresholds,
    Outcomes,
    outcomes_from_labels,
    rate,
    subgroup_table,
    tcav_table,
    wilson_interval,
)


def test_torch_free():
    import subprocess

    code = "import sys, audit.compliance; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_wilson_known_values():
    # Brown, Cai & DasGupta (2001): 95 % Wilson interval of 8/10 is (0.4902, 0.9433)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94331, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (20 + 1.96**2), rel=1e-9)  # closed form at k = 0
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(20 / (20 + 1.96**2), rel=1e-9)


@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_estimate_and_is_symmetric(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo2, hi2 = wilson_interval(n - k, n)
    assert lo == pytest.approx(1 - hi2, abs=1e-12) and hi == pytest.approx(1 - lo2, abs=1e-12)
    # it matches the closed form of the score interval
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    if 0 < k < n:
        assert lo == pytest.approx(centre - half, abs=1e-12) and hi == pytest.approx(centre + half, abs=1e-12)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    assert rate(0, 0).value is None


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=200))
def test_outcomes_sum_to_a_confusion_matrix(pairs):
    k = 4
    per_class = [Outcomes() for _ in range(k)]
    for t, p in pairs:
        for c, o in enumerate(outcomes_from_labels(t, p, k)):
            per_class[c] = per_class[c] + o
    for c in range(k):
        o = per_class[c]
        assert o.tp + o.fn + o.fp + o.tn == len(pairs)
        assert o.tp == sum(t == c and p == c for t, p in pairs)
        assert o.positives == sum(t == c for t, _ in pairs)
        assert o.predicted == sum(p == c for _, p in pairs)


def test_subgroup_table_flags_with_guard():
    counts = {
        (ALL, ALL, "cat"): Outcomes(tp=90, fn=10, fp=5, tn=95),
        ("site", "A", "cat"): Outcomes(tp=60, fn=0, fp=2, tn=40),
        ("site", "B", "cat"): Outcomes(tp=30, fn=10, fp=3, tn=55),   # 0.75 < 0.9 - 0.1
        ("stroke", "thin", "cat"): Outcomes(tp=5, fn=5),             # 0.5 but only 10 positives
    }
    rows = {(r.attribute, r.value): r for r in subgroup_table(counts, ["cat"], {("site", "A"): {"cat": 0.99}})}
    assert rows[("site", "B")].flags == ("recall_below_overall",)
    assert rows[("site", "B")].recall.value == pytest.approx(0.75)
    assert rows[("site", "B")].precision.value == pytest.approx(30 / 33)
    assert rows[("site", "A")].flags == ()  # 1.0 is not below the 0.99 baseline - 0.1
    assert rows[("stroke", "thin")].flags == ()
    assert rows[(ALL, ALL)].overall_recall == pytest.approx(0.9)
    tight = ComplianceThresholds(recall_margin=0.1, min_samples=10)
    assert subgroup_table(counts, ["cat"], thresholds=tight)[-1].flags == ("recall_below_overall",)
    # overall rows come first
    assert subgroup_table(counts, ["cat"])[0].attribute == ALL


def test_tcav_table_drift_and_guard():
    rows = {r.concept: r for r in tcav_table({("a", "c"): 45, ("b", "c"): 5}, {("a", "c"): 50, ("b", "c"): 5},
                                              {("a", "c"): 0.5, ("b", "c"): 0.5})}
    assert rows["a"].score.value == pytest.approx(0.9) and rows["a"].flags == ("tcav_drift",)
    assert rows["a"].drift == pytest.approx(0.4)
    assert rows["b"].flags == ()  # 5 samples < 30
    with pytest.raises(ValueError):
        tcav_table({("a", "c"): 3}, {("a", "c"): 2})
