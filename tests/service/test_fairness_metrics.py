"""Fairness counters: every series from the manifest at zero, batches added exactly, readings summed back."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from hansgate.bundle import load_bundle
from hansgate.service.fairness import fairness_counts
from hansgate.service.fairness_metrics import FairnessMetrics


def _samples(reg: CollectorRegistry):
    for family in reg.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                yield s.name, s.labels, s.value


def test_series_are_bounded_and_counts_round_trip(concept_bundle):
    manifest = load_bundle(concept_bundle).manifest
    reg = CollectorRegistry()
    metrics = FairnessMetrics(manifest, registry=reg)
    declared = {(a.name, v) for a in manifest.subgroups for v in a.values}
    start = list(_samples(reg))
    assert start and all(v == 0 for *_, v in start)
    assert {(labels["attribute"], labels["value"]) for _, labels, _ in start} == declared
    assert {labels["class"] for _, labels, _ in start if "class" in labels} == set(manifest.classes)

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(manifest.classes)), size=12)
    attrs = [{"site": "A"}] * 5 + [{"site": "B"}] * 7
    counts = fairness_counts(probs.argmax(1), probs, rng.random((12, len(manifest.concepts))) > 0.5, attrs,
                             manifest.classes, [c.name for c in manifest.concepts])
    metrics.observe(counts)
    metrics.observe(counts)
    read = FairnessMetrics.readings(_samples(reg))
    assert read.rows == {**{g: 0 for g in declared}, **{g: 2 * n for g, n in counts.rows.items()}}
    for key, n in counts.predicted.items():
        assert read.predicted[key] == 2 * n
    for key, p in counts.expected_tp.items():
        assert read.expected_tp[key] == pytest.approx(2 * p)
        assert read.expected_fn[key] == pytest.approx(2 * counts.expected_fn[key])
    for key, n in counts.present.items():
        assert read.present[key] == 2 * n
