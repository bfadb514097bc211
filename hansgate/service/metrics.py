"""The gateway's Prometheus metrics (prometheus-client, multiprocess-safe) and their bookkeeping.

Everything that forms a ratio is a counter (DESIGN.md, Monitoring), so that recall, TCAV
score and presence rate can be summed over workers and replicas before dividing:

=====================================================  =====================================
``hansgate_predictions_total{class}``                  predicted rows per class
``hansgate_concept_present_total{concept}``            rows with concept score > threshold
``hansgate_tcav_samples_total{concept,class}``         rows predicted ``class`` (TCAV denominator)
``hansgate_tcav_positive_total{concept,class}``        of those, positive directional derivative
``hansgate_feedback_total{class,attribute,value,outcome}``  one-vs-rest tp/fn/fp/tn per subgroup;
                                                       ``attribute="_all"`` counts every feedback
``hansgate_feedback_requests_total{result}``           accepted / refused feedback by reason
``hansgate_rejected_requests_total{route,reason}``     refused requests by reason
``hansgate_inference_seconds`` (histogram)             onnxruntime time of a micro-batch (its runs)
``hansgate_batch_rows`` (histogram)                    rows per micro-batch
``hansgate_request_seconds{route}`` (histogram)        request handling time
``hansgate_model_info{...}`` (gauge = 1)               model hash, method, provider in use
``hansgate_baseline_tcav{concept,class}`` (gauge)      manifest baselines, for drift alerts
``hansgate_baseline_recall{attribute,value,class}``    manifest baseline subgroup recall
``hansgate_subgroup_predictions_total{attribute,value,class}`` and the other fairness counters of
``fairness_metrics`` (selection per subgroup, calibrated expected tp/fn, concept presence)
``hansgate_alert_threshold{name}`` (gauge)             margins the alert rules and snapshot use
``hansgate_start_time_seconds`` (gauge)                when this gateway started (a change = restart)
=====================================================  =====================================

Every label value comes from the manifest or a fixed set; all series are created at zero
at start-up so that ratios exist before the first event.

Route labels are ``predict``, ``feedback``, ``compliance`` and ``connection`` (refusals
before a route is known, e.g. slow headers); anything else is ``other``. BentoML's own
request metrics, which label series with the raw request path, are switched off
(``service.service``), so no request can add a series; ``exposition`` serves ``/metrics``.

Multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is
imported, and each gateway uses a directory of its own (``service.multiproc``); this
module imports prometheus_client only inside functions (never at import time). Gauges use
``multiprocess_mode="max"`` (the same value in every worker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from hansgate.audit.compliance import ALL, Outcomes
from hansgate.manifest import Manifest
from hansgate.service.errors import REASONS
from hansgate.service.fairness_metrics import (
    FAIRNESS_METRIC_NAMES,
    FairnessMetrics,
    FairnessReadings,
)

__all__ = ["OUTCOMES", "METRIC_NAMES", "BatchStats", "batch_stats", "GatewayMetrics", "CounterReadings",
           "exposition"]

OUTCOMES = ("tp", "fn", "fp", "tn")
FEEDBACK_RESULTS = ("accepted", "forged_receipt", "wrong_model", "duplicate_feedback", "unknown_request", "expired",
                    "unknown_label", "unknown_attribute", "unknown_value", "invalid")
ROUTES = ("predict", "feedback", "compliance", "connection")

#: names as they appear on /metrics (counters with their _total)
METRIC_NAMES = frozenset({
    "hansgate_predictions_total", "hansgate_concept_present_total", "hansgate_tcav_samples_total",
    "hansgate_tcav_positive_total", "hansgate_feedback_total", "hansgate_feedback_requests_total",
    "hansgate_rejected_requests_total", "hansgate_inference_seconds", "hansgate_batch_rows",
    "hansgate_request_seconds", "hansgate_model_info", "hansgate_baseline_tcav", "hansgate_baseline_recall",
    "hansgate_alert_threshold", "hansgate_start_time_seconds",
}) | FAIRNESS_METRIC_NAMES


@dataclass(frozen=True)
class BatchStats:
    """Counts of one micro-batch: ``classes [K]``, ``present [M]``, ``tcav_positive [M, K]``."""

    classes: np.ndarray
    present: np.ndarray
    tcav_positive: np.ndarray


def batch_stats(logits: np.ndarray, scores: np.ndarray | None, sensitivity: np.ndarray | None,
                thresholds: np.ndarray) -> tuple[np.ndarray, BatchStats]:
    """Predicted classes ``[N]`` and the batch's counts.

    ``logits [N, K]``; ``scores [N, M]`` concept scores, present when ``> thresholds [M]``;
    ``sensitivity [N, M, K]`` directional derivatives: for TCAV (Kim et al. 2018, Eq. 2) each
    row adds to ``tcav_positive[m, k]`` when ``sensitivity[n, m, k] > 0`` for its predicted
    class ``k``.
    """
    n, k = logits.shape
    pred = logits.argmax(1)
    classes = np.bincount(pred, minlength=k)
    if scores is None or sensitivity is None:
        empty = np.zeros(0, np.int64)
        return pred, BatchStats(classes, empty, np.zeros((0, k), np.int64))
    present = (scores > thresholds[None, :]).sum(0)
    own = sensitivity[np.arange(n), :, pred]  # [N, M]: derivative of the predicted class's logit
    m = scores.shape[1]
    # cell (m, pred) of an [M, K] table, counted where the derivative is positive: one bincount
    cells = (np.arange(m) * k)[None, :] + pred[:, None]  # [N, M]
    tcav_positive = np.bincount(cells[own > 0], minlength=m * k).reshape(m, k)
    return pred, BatchStats(classes, present, tcav_positive)


@dataclass
class CounterReadings:
    """Current counter values summed over this machine's workers (for the compliance snapshot)."""

    feedback: dict[tuple[str, str, str], Outcomes]
    tcav_positive: dict[tuple[str, str], int]
    tcav_samples: dict[tuple[str, str], int]
    predictions: dict[str, int]
    fairness: FairnessReadings


class GatewayMetrics:
    """Creates the metrics for one manifest and records batches, feedback and refusals.

    ``registry``: where to register (prometheus_client's default registry when ``None``);
    tests pass a fresh ``CollectorRegistry`` and read it back.
    """

    def __init__(self, manifest: Manifest, provider: str, thresholds: dict[str, float],
                 registry: Any | None = None, started_at: float | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.manifest = manifest
        self.registry = REGISTRY if registry is None else registry
        reg = self.registry
        classes = manifest.classes
        concepts = [c.name for c in manifest.concepts]
        self._classes = classes
        self._concepts = concepts
        self._attributes = {a.name: list(a.values) for a in manifest.subgroups}
        self.predictions = Counter("hansgate_predictions", "Predicted rows per class", ["class"], registry=reg)
        #: per-subgroup selection, label-free recall and concept presence (``fairness_metrics``)
        self.fairness = FairnessMetrics(manifest, registry=reg)
        self.present = Counter("hansgate_concept_present", "Rows whose concept score exceeds the presence threshold",
                               ["concept"], registry=reg)
        self.tcav_samples = Counter("hansgate_tcav_samples", "Rows counted for TCAV per concept and predicted class",
                                    ["concept", "class"], registry=reg)
        self.tcav_positive = Counter("hansgate_tcav_positive",
                                     "Rows with a positive directional derivative of the predicted class's logit "
                                     "along the concept's CAV", ["concept", "class"], registry=reg)
        self.feedback = Counter("hansgate_feedback", "One-vs-rest outcomes of labelled predictions per class and "
                                "subgroup (attribute=_all: every feedback)", ["class", "attribute", "value", "outcome"],
                                registry=reg)
        self.feedback_requests = Counter("hansgate_feedback_requests", "Feedback requests by result", ["result"],
                                         registry=reg)
        self.rejected = Counter("hansgate_rejected_requests", "Refused requests by route and reason",
                                ["route", "reason"], registry=reg)
        self.inference_seconds = Histogram("hansgate_inference_seconds", "onnxruntime time per micro-batch",
                                           registry=reg, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5,
                                                                  1, 2, 5))
        self.batch_rows = Histogram("hansgate_batch_rows", "Rows per micro-batch", registry=reg,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.request_seconds = Histogram("hansgate_request_seconds", "Request handling time", ["route"], registry=reg,
                                         buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
        info = Gauge("hansgate_model_info", "The served model (value 1)",
                     ["model_sha256", "method", "provider", "schema_version", "hansgate_version"],
                     registry=reg, multiprocess_mode="max")
        info.labels(manifest.graph.sha256, manifest.method.name, provider, manifest.schema_version,
                    manifest.hansgate_version).set(1)
        baseline_tcav = Gauge("hansgate_baseline_tcav", "Deployment baseline TCAV score per concept and class",
                              ["concept", "class"], registry=reg, multiprocess_mode="max")
        for c in manifest.concepts:
            for cls, value in c.baseline_tcav.items():
                if cls in classes:
                    baseline_tcav.labels(c.name, cls).set(value)
        baseline_recall = Gauge("hansgate_baseline_recall", "Baseline recall per subgroup and class (manifest)",
                                ["attribute", "value", "class"], registry=reg, multiprocess_mode="max")
        for a in manifest.subgroups:
            for group, per_class in a.baseline_recall.items():
                for cls, r in per_class.items():
                    if group in a.values and cls in classes:
                        baseline_recall.labels(a.name, group, cls).set(r)
        alert = Gauge("hansgate_alert_threshold", "Margins and guards of the alert rules and compliance flags",
                      ["name"], registry=reg, multiprocess_mode="max")
        for name, value in thresholds.items():
            alert.labels(name).set(value)
        if started_at is not None:
            Gauge("hansgate_start_time_seconds", "When this gateway started (unix time); a new value means a "
                  "restart, after which its counters begin again at zero", registry=reg,
                  multiprocess_mode="max").set(started_at)
        # all series at zero from the start, so that ratios and rates exist before the first event
        for cls in classes:
            self.predictions.labels(cls)
            for outcome in OUTCOMES:
                self.feedback.labels(cls, ALL, ALL, outcome)
                for attr, values in self._attributes.items():
                    for v in values:
                        self.feedback.labels(cls, attr, v, outcome)
        for name in concepts:
            self.present.labels(name)
            for cls in classes:
                self.tcav_samples.labels(name, cls)
                self.tcav_positive.labels(name, cls)
        for result in FEEDBACK_RESULTS:
            self.feedback_requests.labels(result)
        for route in ROUTES:
            self.request_seconds.labels(route)
            for reason in REASONS:
                self.rejected.labels(route, reason)
        # the children the hot path increments, looked up once
        self._pred_children = [self.predictions.labels(c) for c in classes]
        self._present_children = [self.present.labels(c) for c in concepts]
        self._samples_children = [[self.tcav_samples.labels(c, k) for k in classes] for c in concepts]
        self._positive_children = [[self.tcav_positive.labels(c, k) for k in classes] for c in concepts]
        self.predict_seconds = self.request_seconds.labels("predict")

    # -- recording -----------------------------------------------------------------------------------
    def observe_batch(self, stats: BatchStats, seconds: float, rows: int) -> None:
        self.inference_seconds.observe(seconds)
        self.batch_rows.observe(rows)
        seen = np.flatnonzero(stats.classes).tolist()
        counts = stats.classes.tolist()
        for i in seen:
            self._pred_children[i].inc(counts[i])
        if len(stats.present) == 0:
            return
        for j, v in enumerate(stats.present.tolist()):
            if v:
                self._present_children[j].inc(v)
        positive = stats.tcav_positive.tolist()
        for m in range(len(self._concepts)):
            for i in seen:
                self._samples_children[m][i].inc(counts[i])
                if positive[m][i]:
                    self._positive_children[m][i].inc(positive[m][i])

    def observe_feedback(self, predicted: int, true: int, attributes: dict[str, str]) -> None:
        """Count one labelled prediction for every class, overall and per declared attribute."""
        groups = [(ALL, ALL)] + sorted(attributes.items())
        for c, cls in enumerate(self._classes):
            if c == true:
                outcome = "tp" if predicted == true else "fn"
            elif c == predicted:
                outcome = "fp"
            else:
                outcome = "tn"
            for attr, value in groups:
                self.feedback.labels(cls, attr, value, outcome).inc()
        self.feedback_requests.labels("accepted").inc()

    def reject(self, route: str, reason: str) -> None:
        route = route if route in ROUTES else "other"
        reason = reason if reason in REASONS else "other"
        self.rejected.labels(route, reason).inc()
        if route == "feedback":
            self.feedback_requests.labels(reason if reason in FEEDBACK_RESULTS else "invalid").inc()

    # -- reading -------------------------------------------------------------------------------------
    def readings(self) -> CounterReadings:
        """Current counter values, summed over every worker of this machine in multiprocess mode."""
        fams = list(_collect(self.registry))
        feedback: dict[tuple[str, str, str], dict[str, int]] = {}
        pos: dict[tuple[str, str], int] = {}
        samples: dict[tuple[str, str], int] = {}
        preds: dict[str, int] = {}
        for name, labels, value in fams:
            v = int(round(value))
            if name == "hansgate_feedback_total":
                key = (labels["attribute"], labels["value"], labels["class"])
                d = feedback.setdefault(key, {})
                d[labels["outcome"]] = d.get(labels["outcome"], 0) + v
            elif name == "hansgate_tcav_positive_total":
                k2 = (labels["concept"], labels["class"])
                pos[k2] = pos.get(k2, 0) + v
            elif name == "hansgate_tcav_samples_total":
                k2 = (labels["concept"], labels["class"])
                samples[k2] = samples.get(k2, 0) + v
            elif name == "hansgate_predictions_total":
                preds[labels["class"]] = preds.get(labels["class"], 0) + v
        return CounterReadings({k: Outcomes(**{o: d.get(o, 0) for o in OUTCOMES}) for k, d in feedback.items()},
                               pos, samples, preds, FairnessMetrics.readings(fams))


def _collect(registry: Any) -> Iterable[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of the counters, across processes when multiprocess mode is on."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    from prometheus_client import REGISTRY

    if directory and registry is REGISTRY:
        from prometheus_client import CollectorRegistry, multiprocess

        source: Any = CollectorRegistry()
        multiprocess.MultiProcessCollector(source, path=directory)
    else:
        source = registry
    for family in source.collect():
        if not family.name.startswith("hansgate_"):
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                yield s.name, s.labels, s.value


def exposition(registry: Any | None = None) -> tuple[bytes, str]:
    """The ``/metrics`` body and content type: every worker's values (multiprocess mode, this
    gateway's own directory) or ``registry``'s."""
    from prometheus_client import (
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and (registry is None or registry is REGISTRY):
        source = CollectorRegistry()
        multiprocess.MultiProcessCollector(source, path=directory)
        return generate_latest(source), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY if registry is None else registry), CONTENT_TYPE_LATEST
