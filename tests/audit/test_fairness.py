"""Demographic parity and equalized odds against numpy closed forms, fairlearn's summaries and the guards."""

from __future__ import annotations

import numpy as np
from fairlearn.metrics import demographic_parity_difference, demographic_parity_ratio
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.audit.compliance import wilson_interval
from hansgate.audit.fairness import fairness_section, model_fairness

CLASSES = ["a", "b", "c"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from(["x", "y", "z"])),
                min_size=2, max_size=60))
def test_rates_match_numpy(rows):
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows])
    g = np.array([r[2] for r in rows])
    fm = model_fairness(y, p, {"g": g}, CLASSES, min_samples=1)
    values = sorted(set(g.tolist()))
    assert len(fm.selection) == len(fm.odds) == len(values) * 3 and len(fm.parity) == len(fm.odds_gaps) == 3
    for row in fm.selection:
        c = CLASSES.index(row.class_name)
        m = g == row.value
        assert (row.predicted, row.total) == (int((p[m] == c).sum()), int(m.sum()))
        assert row.rate == row.predicted / row.total
        assert (row.low, row.high) == wilson_interval(row.predicted, row.total)
        top = max((p[g == v] == c).mean() for v in values)
        assert row.ratio_to_max == (None if top == 0 else row.rate / top)
    for row in fm.odds:
        c = CLASSES.index(row.class_name)
        m = g == row.value
        pos, neg = m & (y == c), m & (y != c)
        assert (row.positives, row.negatives) == (int(pos.sum()), int(neg.sum()))
        assert row.tpr == (None if not pos.any() else float((p[pos] == c).mean()))
        assert row.fpr == (None if not neg.any() else float((p[neg] == c).mean()))
    for row in fm.parity:
        c = CLASSES.index(row.class_name)
        rates = [r.rate for r in fm.selection if r.class_name == row.class_name]
        assert row.difference == max(rates) - min(rates)
        assert abs(row.difference - demographic_parity_difference((y == c).astype(int), (p == c).astype(int),
                                                                  sensitive_features=g)) < 1e-12
        if row.ratio is not None:  # fairlearn's ratio is the lowest ratio_to_max
            assert row.ratio == demographic_parity_ratio((y == c).astype(int), (p == c).astype(int),
                                                         sensitive_features=g)
            assert abs(row.ratio - min(rates) / max(rates)) < 1e-12
    for gap in fm.odds_gaps:
        tprs = [o.tpr for o in fm.odds if o.class_name == gap.class_name and o.tpr is not None]
        assert gap.tpr_gap == (max(tprs) - min(tprs) if len(tprs) >= 2 else None)


def _stream(n_a: int, n_b: int, sel_a: float, sel_b: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels all class 0; group A predicted 0 at ``sel_a``, group B at ``sel_b`` (else class 1)."""
    g = np.array(["A"] * n_a + ["B"] * n_b)
    p = np.concatenate([(np.arange(n_a) >= round(sel_a * n_a)).astype(int),
                        (np.arange(n_b) >= round(sel_b * n_b)).astype(int)])
    return np.zeros(n_a + n_b, dtype=int), p, g


def test_four_fifths_rule_fires_and_respects_the_sample_guard():
    y, p, g = _stream(100, 100, 0.9, 0.6)  # ratio 0.6 / 0.9 = 0.667 < 0.8
    fm = model_fairness(y, p, {"site": g}, ["0", "1"], min_samples=30)
    b0 = next(r for r in fm.selection if r.value == "B" and r.class_name == "0")
    assert b0.flags == ("four_fifths",) and abs(b0.ratio_to_max - 0.6 / 0.9) < 1e-12
    assert fm.parity[0].flagged and abs(fm.parity[0].ratio - 0.6 / 0.9) < 1e-12
    # the same rates from 20 samples per group: below the guard, no flag
    y, p, g = _stream(20, 20, 0.9, 0.6)
    small = model_fairness(y, p, {"site": g}, ["0", "1"], min_samples=30)
    assert not any(r.flags for r in small.selection) and not small.parity[0].flagged
    # a ratio of 0.85 passes the rule
    y, p, g = _stream(100, 100, 0.8, 0.68)
    assert not model_fairness(y, p, {"site": g}, ["0", "1"], min_samples=30).parity[0].flagged


def test_equalized_odds_gap_and_undefined_rates():
    # class 0: TPR 0.9 in A, 0.5 in B (gap 0.4); B has no negatives for class 0, so its FPR is undefined
    y, p, g = _stream(50, 50, 0.9, 0.5)
    fm = model_fairness(y, p, {"site": g}, ["0", "1"], margin=0.1, min_samples=30)
    gap0 = next(r for r in fm.odds_gaps if r.class_name == "0")
    assert abs(gap0.tpr_gap - 0.4) < 1e-12 and gap0.fpr_gap is None and gap0.flagged
    assert gap0.as_dict()["gap"] == gap0.tpr_gap
    # class 1 has no positives anywhere: no TPR (not 0, as fairlearn's own rate would say), no TPR gap
    rows1 = [o for o in fm.odds if o.class_name == "1"]
    assert all(o.tpr is None and o.tpr_low is None for o in rows1)
    gap1 = next(r for r in fm.odds_gaps if r.class_name == "1")
    assert gap1.tpr_gap is None and abs(gap1.fpr_gap - 0.4) < 1e-12
    # the guard: 20 positives per group are too few to flag
    y, p, g = _stream(20, 20, 0.9, 0.5)
    assert not any(r.flagged for r in model_fairness(y, p, {"site": g}, ["0", "1"], min_samples=30).odds_gaps)


def test_section_layout_matches_the_compliance_keys():
    y, p, g = _stream(40, 40, 0.9, 0.6)
    d = fairness_section(y, {"before": p, "after": y}, {"site": g}, ["0", "1"]).as_dict()
    assert d["status"] == "done" and set(d["models"]) == {"before", "after"}
    row = d["models"]["before"]["selection"][0]
    assert list(row) == ["attribute", "value", "class", "predicted", "total", "rate", "low", "high",
                         "ratio_to_max", "flags"]
    # the perfect "after" model selects class 0 for everyone: ratio 1, nothing flagged
    assert all(r["ratio_to_max"] == 1.0 for r in d["models"]["after"]["selection"] if r["class"] == "0")
    assert not any(r["flagged"] for r in d["models"]["after"]["parity"])
