"""hansgate.service.metrics: per-batch counts against a direct loop, counters with bounded labels."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from prometheus_client import CollectorRegistry

from hansgate.audit.compliance import ALL
from hansgate.bundle import load_bundle
from hansgate.service.metrics import GatewayMetrics, batch_stats

finite = st.floats(-5, 5, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    arrays(np.float32, (n, 3), elements=finite), arrays(np.float32, (n, 2), elements=finite),
    arrays(np.float32, (n, 2, 3), elements=finite))))
def test_batch_stats_matches_a_direct_loop(arrays_):
    logits, scores, sens = arrays_
    thr = np.array([0.0, 1.0], np.float32)
    pred, stats = batch_stats(logits, scores, sens, thr)
    n = len(logits)
    for k in range(3):
        assert stats.classes[k] == sum(int(np.argmax(logits[i])) == k for i in range(n))
    for m in range(2):
        assert stats.present[m] == sum(scores[i, m] > thr[m] for i in range(n))
        for k in range(3):
            assert stats.tcav_positive[m, k] == sum(pred[i] == k and sens[i, m, k] > 0 for i in range(n))


def _value(reg, metric, **labels):
    v = reg.get_sample_value(metric, labels)
    return 0.0 if v is None else v


def test_counters_and_readings(concept_bundle):
    manifest = load_bundle(concept_bundle).manifest
    reg = CollectorRegistry()
    m = GatewayMetrics(manifest, "CPUExecutionProvider", {"recall_margin": 0.1}, registry=reg)
    logits = np.array([[3, 0, 0], [0, 2, 0], [4, 0, 1]], np.float32)
    scores = np.array([[1, -1], [1, 1], [-1, -1]], np.float32)
    sens = np.zeros((3, 2, 3), np.float32)
    sens[0, 0, 0] = 1  # positive for the predicted class of row 0
    sens[1, 0, 0] = 1  # positive, but not for row 1's predicted class
    _, stats = batch_stats(logits, scores, sens, np.zeros(2, np.float32))
    m.observe_batch(stats, 0.01, 3)
    assert _value(reg, "hansgate_predictions_total", **{"class": "cat"}) == 2
    assert _value(reg, "hansgate_concept_present_total", concept="stripes") == 2
    assert _value(reg, "hansgate_tcav_positive_total", concept="stripes", **{"class": "cat"}) == 1
    assert _value(reg, "hansgate_tcav_samples_total", concept="stamp", **{"class": "cat"}) == 2
    assert _value(reg, "hansgate_model_info", model_sha256=manifest.graph.sha256, method="none",
                  provider="CPUExecutionProvider", schema_version=manifest.schema_version, hansgate_version=manifest.hansgate_version) == 1
    assert _value(reg, "hansgate_baseline_tcav", concept="stamp", **{"class": "dog"}) == 0.5
    assert _value(reg, "hansgate_alert_threshold", name="recall_margin") == 0.1
    m.observe_feedback(predicted=0, true=1, attributes={"site": "B"})
    for attr, val in [(ALL, ALL), ("site", "B")]:
        assert _value(reg, "hansgate_feedback_total", attribute=attr, value=val, outcome="fn", **{"class": "dog"}) == 1
        assert _value(reg, "hansgate_feedback_total", attribute=attr, value=val, outcome="fp", **{"class": "cat"}) == 1
        assert _value(reg, "hansgate_feedback_total", attribute=attr, value=val, outcome="tn", **{"class": "fox"}) == 1
    assert _value(reg, "hansgate_feedback_total", attribute="stroke", value="thin", outcome="tn",
                  **{"class": "fox"}) == 0
    r = m.readings()
    assert r.feedback[("site", "B", "dog")].fn == 1 and r.tcav_samples[("stripes", "cat")] == 2
    assert r.predictions == {"cat": 2, "dog": 1, "fox": 0}


def test_reject_labels_are_bounded(concept_bundle):
    reg = CollectorRegistry()
    m = GatewayMetrics(load_bundle(concept_bundle).manifest, "CPUExecutionProvider", {}, registry=reg)
    m.reject("predict", "shape")
    m.reject("predict", "<script>")
    m.reject("whatever", "shape")
    assert _value(reg, "hansgate_rejected_requests_total", route="predict", reason="shape") == 1
    assert _value(reg, "hansgate_rejected_requests_total", route="predict", reason="other") == 1
    assert _value(reg, "hansgate_rejected_requests_total", route="other", reason="shape") == 1
    series = {s.labels.get("reason") for f in reg.collect() for s in f.samples if s.name.startswith("hansgate_rej")}
    assert "<script>" not in series
