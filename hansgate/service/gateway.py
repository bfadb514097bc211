"""The gateway of one worker: bundle, session, batching, monitoring, receipts and the snapshot.

``Gateway`` holds everything a request needs and knows nothing about HTTP (``service.app``
maps it to routes). Dependencies are injected (``registry``, ``cuda_devices``) so tests run
it in-process with a private metrics registry.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

try:  # optional: the standard library's encoder writes the same numbers, slower
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]

from hansgate.audit.compliance import ComplianceThresholds, subgroup_table, tcav_table
from hansgate.bundle import Bundle, load_bundle
from hansgate.errors import RequestError
from hansgate.service.batching import MicroBatcher
from hansgate.service.config import GatewayConfig, load_receipt_key
from hansgate.service.fairness import (
    Calibrator,
    FairnessThresholds,
    check_attributes,
    estimated_table,
    fairness_counts,
    parse_attribute_header,
    row_attributes,
    selection_table,
)
from hansgate.service.inputs import Preprocessor
from hansgate.service.metrics import GatewayMetrics, batch_stats
from hansgate.service.receipts import PredictionStore, ReceiptSigner, new_request_id
from hansgate.service.runtime import OnnxRuntime, Outputs
from hansgate.service.schemas import FeedbackRequest
from hansgate.service.threads import name_os_thread

__all__ = ["Gateway"]

log = logging.getLogger("hansgate.service")


@dataclass(frozen=True)
class _Job:
    x: np.ndarray
    request_id: str
    #: declared subgroup attributes per row (validated), or ``None`` when the request sent none
    attributes: list[dict[str, str]] | None = None


def _rows_json(a: np.ndarray) -> list[str]:
    """Each row of a finite 2-d array as the inside of a JSON list (``"0.1,0.9"``), from one call of
    a JSON encoder (shortest round-trip floats): orjson straight from the array (no Python floats),
    else the standard library's."""
    if a.shape[1] == 0:
        return [""] * len(a)
    if orjson is not None:
        text = orjson.dumps(np.ascontiguousarray(a), option=orjson.OPT_SERIALIZE_NUMPY).decode()
    else:
        text = json.dumps(a.tolist(), separators=(",", ":"))
    return text[2:-2].split("],[")


def _objects_json(keys: list[str], a: np.ndarray) -> list[str]:
    """Each row of a finite ``[N, M]`` array as a JSON object over the JSON-encoded ``keys``
    (``{"k1":0.5,"k2":-1.0}``): one encoder call for the array, one format per row."""
    template = "{" + ",".join(f"{k}:%s" for k in keys) + "}"
    if len(keys) == 1:
        return [template % v for v in _rows_json(a)]
    values = iter(",".join(_rows_json(a)).split(","))
    return [template % row for row in zip(*[values] * len(keys))]


def _signs(sensitivity: np.ndarray, pred: np.ndarray) -> str:
    """The concept signs of every row, concatenated (``M`` characters a row): ``+`` where the
    directional derivative of the predicted class's logit is positive (TCAV, Kim et al. 2018, Eq. 2)."""
    own = sensitivity[np.arange(len(pred)), :, pred]  # [N, M]
    return np.where(own > 0, ord("+"), ord("-")).astype(np.uint8).tobytes().decode("ascii")


def _run_groups(sizes: list[int], fill_rows: int) -> list[tuple[int, int]]:
    """The ranges of consecutive jobs that share one onnxruntime run. A job of ``fill_rows`` rows or more runs
    on its own array; smaller jobs join a run until it has ``fill_rows`` rows. onnxruntime's cost per row stops
    falling at about a full run, while copying full requests into a larger one costs time and memory (two
    64-row requests at 224 px are 74 MiB)."""
    groups: list[tuple[int, int]] = []
    start, rows = 0, 0
    for i, n in enumerate(sizes):
        if n >= fill_rows and start < i:  # the smaller jobs before a full one run without it
            groups.append((start, i))
            start, rows = i, 0
        rows += n
        if rows >= fill_rows:
            groups.append((start, i + 1))
            start, rows = i + 1, 0
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return groups


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class Gateway:
    """One worker's gateway. ``workers`` sizes onnxruntime's threads (cores / workers); ``started_at``
    is when the gateway (not this worker) started, exported as ``hansgate_start_time_seconds``."""

    def __init__(self, cfg: GatewayConfig, workers: int = 1, registry: Any | None = None,
                 cuda_devices: int | None = None, started_at: float | None = None) -> None:
        self.cfg = cfg
        self.bundle: Bundle = load_bundle(cfg.bundle, public_key=cfg.public_key)
        self.manifest = self.bundle.manifest
        self.model_sha256 = self.manifest.graph.sha256
        self.runtime = OnnxRuntime(self.bundle, cfg.provider, cfg.threads(workers), cfg.monitoring, cuda_devices,
                                   memory_patterns=cfg.ort_memory_patterns)
        self.provider = self.runtime.provider_
        self.preprocessor = Preprocessor(self.manifest.input, cfg.max_batch)
        self.thresholds = ComplianceThresholds(cfg.recall_margin, cfg.tcav_margin, cfg.min_samples)
        self.metrics = GatewayMetrics(self.manifest, self.provider, {
            "recall_margin": cfg.recall_margin, "tcav_margin": cfg.tcav_margin, "min_samples": cfg.min_samples,
            "presence_surge_factor": cfg.presence_surge_factor, "disparate_impact_ratio": cfg.disparate_impact_ratio,
            "equalized_odds_gap": cfg.equalized_odds_gap}, registry=registry,
            started_at=time.time() if started_at is None else started_at)
        self.signer = ReceiptSigner(load_receipt_key(cfg), self.model_sha256, cfg.receipt_ttl_s,
                                    n_classes=len(self.manifest.classes), n_concepts=len(self.manifest.concepts))
        self.store = PredictionStore(cfg.state_dir / f"{self.model_sha256[:16]}.sqlite", cfg.store_size,
                                     cfg.receipt_ttl_s)
        self._presence = np.asarray([c.presence_threshold for c in self.manifest.concepts], np.float32)
        self._classes = self.manifest.classes
        self._concepts = [c.name for c in self.manifest.concepts]
        # JSON-encoded names, once: the response is written directly on the hot path
        self._class_parts = [f'"class_index":{i},"class":{json.dumps(c)}' for i, c in enumerate(self._classes)]
        self._concept_keys = [json.dumps(c) for c in self._concepts]
        self._class_index = {c: i for i, c in enumerate(self._classes)}
        #: declared subgroup attributes and their values (what a request may send)
        self.declared = {a.name: list(a.values) for a in self.manifest.subgroups}
        calibration = self.manifest.calibration
        self._calibrator = Calibrator(calibration, len(self._classes)) if calibration is not None else None
        self.fairness_thresholds = FairnessThresholds(cfg.disparate_impact_ratio, cfg.min_samples, cfg.presence_bound)
        # feedback touches SQLite (may wait on the other workers' writes): a small fixed pool keeps
        # it off the event loop without growing a thread (and a malloc arena) per concurrent request
        self.io_executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="hansgate-io",
                                                                 initializer=name_os_thread, initargs=("hansgate-io",))
        row_bytes = 4 * int(np.prod(self.manifest.input.shape))  # float32
        self.batcher: MicroBatcher[_Job, bytes | RequestError] = MicroBatcher(
            self._run_batch, cfg.merge_rows(row_bytes), cfg.microbatch_wait_ms / 1000.0, fill_rows=cfg.microbatch_rows)
        # one dry run so that the first request does not pay for onnxruntime's lazy set-up
        self.runtime.run(np.zeros((1, *self.manifest.input.shape), np.float32))
        self.ready = True
        log.info("gateway ready: model %s (%s) on %s", self.model_sha256[:12], self.manifest.method.name,
                 self.provider)

    # -- predictions ---------------------------------------------------------------------------------
    async def predict(self, x: np.ndarray, attributes: Any = None) -> bytes:
        """The JSON response (bytes) for a preprocessed batch ``x [N, C, H, W]``, run together with
        concurrent requests; ``RequestError('non_finite_output')`` when the graph gives NaN/inf.

        ``attributes``: declared subgroup attributes, one object for every row or a list with one per
        row (``fairness.row_attributes``); counted per subgroup and signed into each row's receipt.
        """
        rows = row_attributes(attributes, len(x), self.declared) if attributes is not None else None
        out = await self.batcher.submit(_Job(x, new_request_id(), rows), len(x))
        if isinstance(out, RequestError):  # the batcher raises these; this is for the type checker
            raise out
        return out

    def _run_batch(self, jobs: Sequence[_Job]) -> list[bytes | RequestError]:
        """Run the jobs as one micro-batch (in the onnxruntime runs ``_run_groups`` forms); each job's JSON
        reply (or its ``RequestError``).

        Per row, only what must be per row runs in Python (its receipt's HMAC and one format of
        its reply); signs, concept objects and probabilities are built for the whole batch, the
        store takes one row per request in one transaction, metrics one increment per class.
        """
        sizes = [len(j.x) for j in jobs]
        n_rows = sum(sizes)
        groups = _run_groups(sizes, self.cfg.microbatch_rows)
        t0 = time.perf_counter()
        out = Outputs.concatenate([self.runtime.run(jobs[a].x if b - a == 1 else
                                                    np.concatenate([j.x for j in jobs[a:b]])) for a, b in groups])
        seconds = time.perf_counter() - t0
        logits, scores, sens = out.logits, out.concept_scores, out.concept_sensitivity
        ok_job = [True] * len(jobs)
        # rows whose outputs are not all finite are refused (never counted, never answered with NaN)
        if not (np.isfinite(logits).all() and (scores is None or np.isfinite(scores).all())
                and (sens is None or np.isfinite(sens).all())):
            finite = np.isfinite(logits).all(1)
            if scores is not None:
                finite &= np.isfinite(scores).all(1)
            if sens is not None:
                finite &= np.isfinite(sens).reshape(n_rows, -1).all(1)
            bounds = [0, *itertools.accumulate(sizes)]
            ok_job = [bool(finite[a:b].all()) for a, b in zip(bounds[:-1], bounds[1:])]
            keep = np.repeat(np.asarray(ok_job), sizes)
            logits = logits[keep]
            scores = scores[keep] if scores is not None else None
            sens = sens[keep] if sens is not None else None
        # per-row attributes only when a request sent some (most batches carry none)
        row_attrs = [a for job, ok in zip(jobs, ok_job) if ok
                     for a in (job.attributes if job.attributes is not None else [{}] * len(job.x))] \
            if any(job.attributes is not None for job in jobs) else None
        if self.cfg.monitoring and len(logits):
            pred, stats = batch_stats(logits, scores, sens, self._presence)
            self.metrics.observe_batch(stats, seconds, n_rows)
            if row_attrs is not None and any(row_attrs):
                self._observe_fairness(logits, scores, pred, row_attrs)
        else:
            pred = logits.argmax(1)
        probs = _rows_json(_softmax(logits.astype(np.float64)))
        m = len(self._concepts)
        signs = _signs(sens, pred) if sens is not None and m else ""
        concept_rows = _objects_json(self._concept_keys, scores) if scores is not None and m \
            else ["{}"] * len(logits)
        now = time.time()
        pred_list = pred.tolist()
        results: list[bytes | RequestError] = []
        store_rows: list[tuple[str, list[int], list[str], float]] = []
        class_parts = self._class_parts
        a = 0
        for job, ok in zip(jobs, ok_job):
            if not ok:
                results.append(RequestError("the model produced NaN or infinity for this input; the row is "
                                            "refused and not counted", "non_finite_output"))
                continue
            b = a + len(job.x)
            rid = job.request_id
            classes = pred_list[a:b]
            # no signs where the graph computed no sensitivities (monitoring off, or no concepts)
            row_signs = [""] * (b - a) if not signs else list(signs[a:b]) if m == 1 else \
                [signs[i:i + m] for i in range(a * m, b * m, m)]
            store_rows.append((rid, classes, row_signs, now))
            attrs = [",".join(f"{k}={v}" for k, v in sorted(r.items())) for r in row_attrs[a:b]] \
                if row_attrs else None
            receipts = self.signer.sign_rows(rid, classes, row_signs, now, attrs)
            parts = ",".join([f'{{"request_id":"{rid}-{j}",{class_parts[c]},"probabilities":[{p}],'
                              f'"concept_scores":{s},"receipt":"{r}"}}'
                              for j, c, p, s, r in zip(range(b - a), classes, probs[a:b], concept_rows[a:b],
                                                       receipts)])
            results.append(f'{{"request_id":"{rid}","model_sha256":"{self.model_sha256}",'
                           f'"predictions":[{parts}]}}'.encode())
            a = b
        if store_rows:
            self.store.add_requests(store_rows)
        return results

    def _observe_fairness(self, logits: np.ndarray, scores: np.ndarray | None, pred: np.ndarray,
                          attributes: list[dict[str, str]]) -> None:
        """Selection, calibrated expected tp/fn and concept presence per subgroup (``service.fairness``)."""
        probs = self._calibrator(logits) if self._calibrator is not None else None
        present = scores > self._presence if scores is not None and len(self._concepts) else None
        self.metrics.fairness.observe(fairness_counts(pred, probs, present, attributes, self._classes,
                                                      self._concepts))

    # -- feedback ------------------------------------------------------------------------------------
    def feedback(self, req: FeedbackRequest) -> dict:
        """Count one label for one prediction (blocking: call it off the event loop)."""
        true = self._class_index.get(req.label)
        if true is None:
            raise RequestError(f"label {req.label[:64]!r} is not a class of this model", "unknown_label")
        check_attributes(req.attributes, self.declared)
        if req.receipt is not None:
            receipt = self.signer.verify(req.receipt)
            if req.request_id is not None and req.request_id != receipt.request_id:
                raise RequestError("request_id does not match the receipt", "invalid")
        else:
            assert req.request_id is not None
            receipt = self.store.lookup(req.request_id, self.model_sha256)
        if not 0 <= receipt.class_index < len(self._classes):  # the store and the signer check it too
            raise RequestError("the prediction's class index is not a class of this model", "forged_receipt")
        # attributes sent now win; otherwise those the prediction carried (signed into its receipt)
        attributes = dict(req.attributes) or parse_attribute_header(receipt.attributes, self.declared)
        self.store.claim(receipt.request_id)
        try:
            self.metrics.observe_feedback(receipt.class_index, true, attributes)
        except BaseException:
            self.store.release(receipt.request_id)
            raise
        return {"request_id": receipt.request_id, "predicted": self._classes[receipt.class_index],
                "label": req.label, "correct": receipt.class_index == true, "attributes": attributes}

    # -- compliance ----------------------------------------------------------------------------------
    def compliance(self) -> dict:
        """Subgroup recall/precision (Wilson 95 % intervals), TCAV now vs baseline and flags.

        Computed from this machine's counters (all workers); fleet-wide figures are the same
        ratios over counters summed in Prometheus (``service/prometheus/rules.yml``).
        """
        r = self.metrics.readings()
        baseline_recall = {(a.name, v): per_class for a in self.manifest.subgroups
                           for v, per_class in a.baseline_recall.items()}
        subgroups = subgroup_table(r.feedback, self._classes, baseline_recall, self.thresholds)
        baseline_tcav = {(c.name, cls): v for c in self.manifest.concepts for cls, v in c.baseline_tcav.items()}
        tcav = tcav_table(r.tcav_positive, r.tcav_samples, baseline_tcav, self.thresholds)
        flags = [{"kind": f, "attribute": s.attribute, "value": s.value, "class": s.class_name}
                 for s in subgroups for f in s.flags]
        flags += [{"kind": f, "concept": t.concept, "class": t.class_name} for t in tcav for f in t.flags]
        total_feedback = sum(o.positives for (a, _, _), o in r.feedback.items() if a == "_all")
        f = r.fairness
        realized = {key: (o.tp, o.positives) for key, o in r.feedback.items() if key[0] != "_all"}
        selection = selection_table(f.predicted, f.rows, self.declared, self._classes, self.fairness_thresholds)
        estimated = estimated_table(f.expected_tp, f.expected_fn, realized, f.present, f.rows, self.declared,
                                    self._classes, self._concepts, self._calibrator is not None,
                                    self.fairness_thresholds)
        flags += [{"kind": flag, "attribute": e["attribute"], "value": e["value"], "class": e["class"]}
                  for e in selection for flag in e["flags"] if flag == "adverse_impact"]
        return {
            "model_sha256": self.model_sha256,
            "method": self.manifest.method.name,
            "provider": self.provider,
            "generated_at": time.time(),
            "scope": "this replica (all workers); fleet-wide: sum the counters in Prometheus",
            "thresholds": {"recall_margin": self.thresholds.recall_margin,
                           "tcav_margin": self.thresholds.tcav_margin, "min_samples": self.thresholds.min_samples,
                           "disparate_impact_ratio": self.fairness_thresholds.ratio_bound,
                           "presence_bound": self.fairness_thresholds.presence_bound,
                           "interval": "Wilson score, 95 %"},
            "predictions": sum(r.predictions.values()),
            "feedback": total_feedback,
            "subgroups": [s.as_dict() for s in subgroups],
            "tcav": [t.as_dict() for t in tcav],
            "selection": selection,
            "estimated": estimated,
            "calibration": self.manifest.calibration.model_dump() if self.manifest.calibration else None,
            "flags": flags,
        }

    def close(self) -> None:
        self.batcher.close()
        self.io_executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()
