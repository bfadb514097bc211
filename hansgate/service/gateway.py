"""The gateway of one worker: bundle, session, batching, monitoring, receipts and the snapshot.

``Gateway`` holds everything a request needs and knows nothing about HTTP (``service.app``
maps it to routes). Dependencies are injected (``registry``, ``cuda_devices``) so tests run
it in-process with a private metrics registry.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hansgate.audit.compliance import ComplianceThresholds, subgroup_table, tcav_table
from hansgate.bundle import Bundle, load_bundle
from hansgate.errors import RequestError
from hansgate.service.batching import MicroBatcher
from hansgate.service.config import GatewayConfig, load_receipt_key
from hansgate.service.inputs import Preprocessor
from hansgate.service.metrics import GatewayMetrics, batch_stats
from hansgate.service.receipts import PredictionStore, Receipt, ReceiptSigner
from hansgate.service.runtime import OnnxRuntime
from hansgate.service.schemas import FeedbackRequest

__all__ = ["Gateway"]

log = logging.getLogger("hansgate.service")


@dataclass(frozen=True)
class _Job:
    x: np.ndarray
    request_id: str


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class Gateway:
    """One worker's gateway. ``workers`` sizes onnxruntime's threads (cores / workers)."""

    def __init__(self, cfg: GatewayConfig, workers: int = 1, registry: Any | None = None,
                 cuda_devices: int | None = None) -> None:
        self.cfg = cfg
        self.bundle: Bundle = load_bundle(cfg.bundle)
        self.manifest = self.bundle.manifest
        self.model_sha256 = self.manifest.graph.sha256
        self.runtime = OnnxRuntime(self.bundle, cfg.provider, cfg.threads(workers), cfg.monitoring, cuda_devices)
        self.provider = self.runtime.provider_
        self.preprocessor = Preprocessor(self.manifest.input, cfg.max_batch)
        self.thresholds = ComplianceThresholds(cfg.recall_margin, cfg.tcav_margin, cfg.min_samples)
        self.metrics = GatewayMetrics(self.manifest, self.provider, {
            "recall_margin": cfg.recall_margin, "tcav_margin": cfg.tcav_margin, "min_samples": cfg.min_samples,
            "presence_surge_factor": cfg.presence_surge_factor}, registry=registry)
        self.signer = ReceiptSigner(load_receipt_key(cfg), self.model_sha256, cfg.receipt_ttl_s)
        self.store = PredictionStore(cfg.state_dir / f"{self.model_sha256[:16]}.sqlite", cfg.store_size,
                                     cfg.receipt_ttl_s)
        self._presence = np.asarray([c.presence_threshold for c in self.manifest.concepts], np.float32)
        self._classes = self.manifest.classes
        self._concepts = [c.name for c in self.manifest.concepts]
        self._class_index = {c: i for i, c in enumerate(self._classes)}
        self._attributes = {a.name: set(a.values) for a in self.manifest.subgroups}
        # feedback touches SQLite (may wait on the other workers' writes): a small fixed pool keeps
        # it off the event loop without growing a thread (and a malloc arena) per concurrent request
        self.io_executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="hansgate-io")
        self.batcher: MicroBatcher[_Job, list[dict]] = MicroBatcher(self._run_batch, cfg.microbatch_rows,
                                                                    cfg.microbatch_wait_ms / 1000.0)
        # one dry run so that the first request does not pay for onnxruntime's lazy set-up
        self.runtime.run(np.zeros((1, *self.manifest.input.shape), np.float32))
        self.ready = True
        log.info("gateway ready: model %s (%s) on %s", self.model_sha256[:12], self.manifest.method.name,
                 self.provider)

    # -- predictions ---------------------------------------------------------------------------------
    async def predict(self, x: np.ndarray) -> dict:
        """Predictions for a preprocessed batch ``x [N, C, H, W]`` (joined with concurrent requests)."""
        request_id = uuid.uuid4().hex
        rows = await self.batcher.submit(_Job(x, request_id), len(x))
        return {"request_id": request_id, "model_sha256": self.model_sha256, "predictions": rows}

    def _run_batch(self, jobs: Sequence[_Job]) -> list[list[dict]]:
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        t0 = time.perf_counter()
        out = self.runtime.run(x)
        seconds = time.perf_counter() - t0
        if self.cfg.monitoring:
            pred, stats = batch_stats(out.logits, out.concept_scores, out.concept_sensitivity, self._presence)
            self.metrics.observe_batch(stats, seconds, len(x))
        else:
            pred = out.logits.argmax(1)
        probs = _softmax(out.logits.astype(np.float64))
        m = len(self._concepts)
        if out.concept_sensitivity is not None and m:
            signs_pos = out.concept_sensitivity[np.arange(len(x)), :, pred] > 0  # [N, M]
        else:
            signs_pos = np.zeros((len(x), 0), bool)
        now = time.time()
        results: list[list[dict]] = []
        store_rows = []
        offset = 0
        for job in jobs:
            rows = []
            for j in range(len(job.x)):
                n = offset + j
                rid = f"{job.request_id}-{j}"
                cls = int(pred[n])
                signs = "".join("+" if s else "-" for s in signs_pos[n])
                receipt = self.signer.sign(Receipt(rid, cls, self.model_sha256, signs, now))
                store_rows.append((rid, cls, signs, now))
                row = {"request_id": rid, "class_index": cls, "class": self._classes[cls],
                       "probabilities": probs[n].tolist(), "concept_scores": {}, "receipt": receipt}
                if out.concept_scores is not None:
                    row["concept_scores"] = dict(zip(self._concepts, out.concept_scores[n].tolist()))
                rows.append(row)
            offset += len(job.x)
            results.append(rows)
        self.store.add(store_rows)
        return results

    # -- feedback ------------------------------------------------------------------------------------
    def feedback(self, req: FeedbackRequest) -> dict:
        """Count one label for one prediction (blocking: call it off the event loop)."""
        true = self._class_index.get(req.label)
        if true is None:
            raise RequestError(f"label {req.label[:64]!r} is not a class of this model", "unknown_label")
        for name, value in req.attributes.items():
            if name not in self._attributes:
                raise RequestError(f"attribute {name[:64]!r} is not declared by the manifest "
                                   f"(declared: {sorted(self._attributes)})", "unknown_attribute")
            if value not in self._attributes[name]:
                raise RequestError(f"value {value[:64]!r} of attribute {name!r} is not declared "
                                   f"(allowed: {sorted(self._attributes[name])})", "unknown_value")
        if req.receipt is not None:
            receipt = self.signer.verify(req.receipt)
            if req.request_id is not None and req.request_id != receipt.request_id:
                raise RequestError("request_id does not match the receipt", "invalid")
        else:
            assert req.request_id is not None
            receipt = self.store.lookup(req.request_id, self.model_sha256)
        self.store.claim(receipt.request_id)
        try:
            self.metrics.observe_feedback(receipt.class_index, true, dict(req.attributes))
        except BaseException:
            self.store.release(receipt.request_id)
            raise
        return {"request_id": receipt.request_id, "predicted": self._classes[receipt.class_index],
                "label": req.label, "correct": receipt.class_index == true, "attributes": dict(req.attributes)}

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
        return {
            "model_sha256": self.model_sha256,
            "method": self.manifest.method.name,
            "provider": self.provider,
            "generated_at": time.time(),
            "scope": "this replica (all workers); fleet-wide: sum the counters in Prometheus",
            "thresholds": {"recall_margin": self.thresholds.recall_margin,
                           "tcav_margin": self.thresholds.tcav_margin, "min_samples": self.thresholds.min_samples,
                           "interval": "Wilson score, 95 %"},
            "predictions": sum(r.predictions.values()),
            "feedback": total_feedback,
            "subgroups": [s.as_dict() for s in subgroups],
            "tcav": [t.as_dict() for t in tcav],
            "flags": flags,
        }

    def close(self) -> None:
        self.batcher.close()
        self.io_executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()
