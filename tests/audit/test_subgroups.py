"""Subgroup counts/rates against numpy closed forms, and agreement with the service's compliance math."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.audit.compliance import (
    ALL,
    ComplianceThresholds,
    Outcomes,
    outcomes_from_labels,
    subgroup_table,
)
from hansgate.audit.subgroups import (
    SubgroupAuditor,
    class_counts,
    outcome_counts,
    recall_by_group,
    subgroup_counts,
)

CLASSES = ["a", "b", "c"]


def _numpy_counts(y, p, k):
    return np.array([[np.sum((y == c) & (p == c)), np.sum((y == c) & (p != c)),
                      np.sum((y != c) & (p == c)), np.sum((y != c) & (p != c))] for c in range(k)])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from(["x", "y"])), min_size=1, max_size=60))
def test_counts_match_numpy(rows):
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows])
    g = np.array([r[2] for r in rows])
    np.testing.assert_array_equal(class_counts(y, p, 3), _numpy_counts(y, p, 3))
    overall, by_group = subgroup_counts(y, p, g, 3)
    np.testing.assert_array_equal(overall, _numpy_counts(y, p, 3))
    for v, counts in by_group.items():
        np.testing.assert_array_equal(counts, _numpy_counts(y[g == v], p[g == v], 3))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from(["A", "B"])), min_size=5, max_size=80))
def test_report_counts_equal_service_accumulation(rows):
    """The gateway adds one ``outcomes_from_labels`` per labelled prediction to its counters; the report
    counts with fairlearn. Both must give the same counts, hence the same rows and intervals."""
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows])
    site = np.array([r[2] for r in rows])
    service: dict[tuple[str, str, str], Outcomes] = {}
    for yi, pi, si in zip(y, p, site):
        for c, o in enumerate(outcomes_from_labels(int(yi), int(pi), 3)):
            for key in ((ALL, ALL, CLASSES[c]), ("site", str(si), CLASSES[c])):
                service[key] = service.get(key, Outcomes()) + o
    report = outcome_counts(y, p, {"site": site}, CLASSES)
    assert report == service
    th = ComplianceThresholds(min_samples=1)
    snapshot = [r.as_dict() for r in subgroup_table(service, CLASSES, thresholds=th)]
    auditor = SubgroupAuditor(CLASSES, th).fit(y, {"m": p}, {"site": site})
    for row in snapshot:
        if row["attribute"] == ALL:
            got = auditor.result_["models"]["m"]["overall"]["classes"][row["class"]]
        else:
            got = auditor.result_["models"]["m"]["attributes"]["site"][row["value"]]["classes"][row["class"]]
        assert got["recall"] == row["recall"] and got["precision"] == row["precision"]
        assert got["flags"] == row["flags"]


def test_suppressed_subgroup_is_flagged_and_delta_positive():
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 3, n)
    site = np.where(rng.random(n) < 0.3, "B", "A")
    before = y.copy()
    hit = (site == "B") & (y != 2) & (rng.random(n) < 0.6)  # site B loses recall for classes a, b
    before[hit] = 2
    after = y.copy()
    res = SubgroupAuditor(CLASSES).fit(y, {"before": before, "after": after}, {"site": site}).result_
    b = res["models"]["before"]["attributes"]["site"]["B"]
    assert b["flagged"] and "recall_below_overall" in b["classes"]["a"]["flags"]
    assert not res["models"]["before"]["attributes"]["site"]["A"]["flagged"]
    assert not any(f["model"] == "after" for f in res["flags"])
    assert res["delta"]["site"]["B"]["recall"]["a"] > 0.4
    expected = np.mean(before[(site == "B") & (y == 0)] == 0)
    assert np.isclose(b["classes"]["a"]["recall"]["value"], expected)
    lo, hi = b["classes"]["a"]["recall"]["low"], b["classes"]["a"]["recall"]["high"]
    assert lo < expected < hi


def test_recall_by_group_matches_closed_form():
    y = np.array([0, 0, 1, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0, 2])
    g = np.array(["u", "u", "u", "v", "v", "v"])
    out = recall_by_group(y, p, g, CLASSES)
    assert out == {"u": {"a": 0.5, "b": 1.0}, "v": {"b": 0.5, "c": 1.0}}
