"""End to end: ``hansgate serve`` (real BentoML, two workers) scraped by a real Prometheus on loopback.

Sends predictions (single and batched), feedback (by receipt and by request id, with
subgroup attributes) and bad requests; then checks that Prometheus scraped exactly the
counts sent and that the recording rules give the recall and TCAV values computed here
from the same inputs with onnxruntime.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from hansgate.audit.compliance import ALL

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: scripts/test.sh installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def served(concept_bundle, tmp_path):
    port = free_port()
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), HANSGATE_STATE_DIR=str(tmp_path / "state"),
               HANSGATE_PROVIDER="cpu", HANSGATE_ORT_THREADS="1", BENTOML_DO_NOT_TRACK="True",
               HANSGATE_ACCESS_LOG="1")  # the access log names the worker of each request (checked below)
    env.pop("HANSGATE_RECEIPT_KEY", None)  # the two workers must agree on the machine-local key file
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hansgate.cli", "serve", str(concept_bundle), "--port", str(port),
                             "--host", "127.0.0.1", "--workers", "2"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 120, "the gateway to be ready")
        yield base, port
    finally:
        stop(proc)
        log.close()
        if proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            print((tmp_path / "serve.log").read_text()[-4000:])


@pytest.fixture
def prometheus(served, tmp_path):
    _, target = served
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "service" / "prometheus" / "rules.yml")],
        "scrape_configs": [{"job_name": "hansgate", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}]}))
    plog = open(tmp_path / "prom.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=plog, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 60, "prometheus to be ready")
        yield base
    finally:
        stop(proc)
        plog.close()


def query(prom: str, expr: str) -> dict[tuple, float]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert r["status"] == "success", r
    return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in r["data"]["result"]}


def expected_outputs(bundle: Path, x: np.ndarray):
    import onnxruntime as ort

    from hansgate.bundle import load_bundle

    b = load_bundle(bundle)
    xn = (x - 0.5) / 0.25  # the manifest's mean/std
    logits, scores, sens = ort.InferenceSession(str(b.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": xn.astype(np.float32)})
    return b.manifest, logits.argmax(1), scores, sens


def test_prometheus_scrapes_exact_counts_and_rules_compute_recall_and_tcav(served, prometheus, concept_bundle,
                                                                          tmp_path):
    base, _ = served
    rng = np.random.default_rng(7)
    sizes = [1] * 40 + [3] * 20 + [8] * 5
    batches = [rng.random((n, 1, 8, 8), dtype=np.float32) for n in sizes]
    x_all = np.concatenate(batches)
    manifest, pred, scores, sens = expected_outputs(concept_bundle, x_all)
    classes, concepts = manifest.classes, [c.name for c in manifest.concepts]

    def post_predict(x):  # a fresh connection each, from 8 threads: the kernel spreads them over both workers
        with httpx.Client(base_url=base, timeout=30) as one:
            r = one.post("/predict", json={"tensor": x.tolist()})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        predictions = [p for rows in pool.map(post_predict, batches) for p in rows]
    with httpx.Client(base_url=base, timeout=30) as http:
        got = [p["class_index"] for p in predictions]
        assert got == pred.tolist()  # same classes as onnxruntime here
        # feedback for 120 of 140 predictions: labels drawn at random, attributes from the manifest
        labels = rng.integers(0, len(classes), len(predictions))
        sites = rng.choice(["A", "B"], len(predictions))
        fed = []
        for i, p in enumerate(predictions[:120]):
            body = {"label": classes[labels[i]], "attributes": {"site": str(sites[i])}}
            body |= {"receipt": p["receipt"]} if i % 2 else {"request_id": p["request_id"]}  # store across workers
            r = http.post("/feedback", json=body)
            assert r.status_code == 200, r.text
            fed.append(i)
        # refusals: counted by reason, never new labels, no 5xx
        assert http.post("/feedback", json={"receipt": predictions[1]["receipt"], "label": "cat"}).status_code == 409
        assert http.post("/feedback", json={"request_id": predictions[130]["request_id"], "label": "cat",
                                            "attributes": {"site": "Mars"}}).status_code == 422
        assert http.post("/predict", json={"tensor": [[1.0]]}).status_code == 422
        assert http.post("/predict", content=b"x" * 10, headers={"content-type": "image/png"}).status_code == 400
        assert http.get("/livez").status_code == 200
        snapshot = http.get("/compliance").json()

    # what Prometheus must see
    exp_pred = Counter(classes[i] for i in pred)
    exp_present = {c: int((scores[:, m] > manifest.concepts[m].presence_threshold).sum()) for m, c in enumerate(concepts)}
    own = sens[np.arange(len(pred)), :, pred]  # [N, M]
    exp_pos = {(c, classes[k]): int(((pred == k) & (own[:, m] > 0)).sum()) for m, c in enumerate(concepts)
               for k in range(len(classes))}
    outcomes: Counter = Counter()
    for i in fed:
        t, p = labels[i], pred[i]
        for k, cls in enumerate(classes):
            o = ("tp" if p == t else "fn") if k == t else ("fp" if k == p else "tn")
            outcomes[(cls, ALL, ALL, o)] += 1
            outcomes[(cls, "site", str(sites[i]), o)] += 1

    def scraped_predictions():
        return {dict(k)["class"]: v for k, v in query(prometheus, "sum by (class) (hansgate_predictions_total)").items()}

    wait_for(lambda: scraped_predictions() == {c: float(exp_pred.get(c, 0)) for c in classes}
             and query(prometheus, 'sum(hansgate_feedback_requests_total{result="accepted"})')
             .get((), 0) == len(fed)
             and query(prometheus, 'sum(hansgate_rejected_requests_total{reason="shape"})').get((), 0) == 1
             and query(prometheus, 'sum(hansgate_rejected_requests_total)').get((), 0) == 4,
             60, "Prometheus to scrape the final counts")

    present = {dict(k)["concept"]: v for k, v in
               query(prometheus, "sum by (concept) (hansgate_concept_present_total)").items()}
    assert present == {c: float(v) for c, v in exp_present.items()}
    pos = {(dict(k)["concept"], dict(k)["class"]): v for k, v in
           query(prometheus, "sum by (concept, class) (hansgate_tcav_positive_total)").items()}
    assert pos == {k: float(v) for k, v in exp_pos.items()}
    fb = {(d["class"], d["attribute"], d["value"], d["outcome"]): v for d, v in
          ((dict(k), v) for k, v in query(prometheus, "sum by (class, attribute, value, outcome) "
                                                      "(hansgate_feedback_total)").items())}
    assert {k: v for k, v in fb.items() if v} == {k: float(v) for k, v in outcomes.items()}
    rejected = {(dict(k)["route"], dict(k)["reason"]): v for k, v in
                query(prometheus, "sum by (route, reason) (hansgate_rejected_requests_total) > 0").items()}
    assert rejected == {("feedback", "duplicate_feedback"): 1, ("feedback", "unknown_value"): 1,
                        ("predict", "shape"): 1, ("predict", "bad_image"): 1}
    info = query(prometheus, "hansgate_model_info")
    assert {dict(k)["provider"] for k in info} == {"CPUExecutionProvider"}

    # recording rules (evaluated every second) against the ratios computed here
    def rule(expr):
        return wait_for(lambda: query(prometheus, expr) or None, 30, expr)

    recall = {(dict(k)["class"], dict(k)["attribute"], dict(k)["value"]): v
              for k, v in rule("hansgate:subgroup_recall:ratio").items()}
    for (cls, attr, val, o), n in outcomes.items():
        if o != "tp":
            continue
        denom = n + outcomes.get((cls, attr, val, "fn"), 0)
        assert recall[(cls, attr, val)] == pytest.approx(n / denom, abs=1e-12)
    tcav = {(dict(k)["concept"], dict(k)["class"]): v for k, v in rule("hansgate:tcav_score:ratio").items()}
    for (c, cls), k in exp_pos.items():
        n = exp_pred.get(cls, 0)
        if n:
            assert tcav[(c, cls)] == pytest.approx(k / n, abs=1e-12)
    presence = {dict(k)["concept"]: v for k, v in rule("hansgate:concept_presence:ratio").items()}
    for c, k in exp_present.items():
        assert presence[c] == pytest.approx(k / len(pred), abs=1e-12)

    # both workers served predictions (BentoML logs the worker index with each request)
    log = (tmp_path / "serve.log").read_text()
    workers = {line.split("[entry_service:hansgate:")[1].split("]")[0] for line in log.splitlines()
               if "path=/predict" in line and "[entry_service:hansgate:" in line}
    assert workers == {"1", "2"}, workers

    # the snapshot reads the same counters (both workers)
    assert snapshot["predictions"] == len(pred) and snapshot["feedback"] == len(fed)
    snap_tcav = {(t["concept"], t["class"]): t["score"]["value"] for t in snapshot["tcav"]}
    for key, v in tcav.items():
        if np.isnan(v):  # 0/0 in PromQL: no row predicted that class; the snapshot says None
            assert snap_tcav[key] is None
        else:
            assert snap_tcav[key] == pytest.approx(v, abs=1e-12)
