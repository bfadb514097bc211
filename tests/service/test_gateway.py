"""hansgate.service.gateway: the micro-batch's hot path against a plain reference built from dicts.

``Gateway._run_batch`` writes each request's JSON reply by hand (no dicts, one encoder call per
array) and signs and stores whole requests at once; these tests rebuild every reply the slow,
obvious way from the same onnxruntime outputs and require the same content, key order and
receipts, and the same store rows and counters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansgate.errors import RequestError
from hansgate.service import gateway as gateway_module
from hansgate.service.gateway import _Job, _run_groups
from hansgate.service.receipts import Receipt
from hansgate.service.runtime import Outputs

T = 1_700_000_000.123456


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def reference(gw, job: _Job, logits, scores, sens) -> dict:
    """One request's reply as a dict, from its rows of the run's outputs."""
    classes = gw.manifest.classes
    concepts = [c.name for c in gw.manifest.concepts]
    probs = softmax64(logits)
    preds = []
    for j in range(len(job.x)):
        k = int(np.argmax(logits[j]))
        signs = "".join("+" if sens[j, m, k] > 0 else "-" for m in range(len(concepts))) if sens is not None else ""
        attrs = ",".join(f"{a}={v}" for a, v in sorted(job.attributes[j].items())) if job.attributes else ""
        preds.append({"request_id": f"{job.request_id}-{j}", "class_index": k, "class": classes[k],
                      "probabilities": probs[j].tolist(),
                      "concept_scores": {c: scores[j, m] for m, c in enumerate(concepts)} if scores is not None
                      else {},
                      "receipt": Receipt(f"{job.request_id}-{j}", k, gw.model_sha256, signs, round(T, 3), attrs)})
    return {"request_id": job.request_id, "model_sha256": gw.model_sha256, "predictions": preds}


def assert_same_reply(raw: bytes, expected: dict, signer) -> None:
    """The reply equals the reference; each receipt verifies to the reference's receipt."""
    got = json.loads(raw)
    assert list(got) == list(expected)
    assert (got["request_id"], got["model_sha256"]) == (expected["request_id"], expected["model_sha256"])
    assert len(got["predictions"]) == len(expected["predictions"])
    for g, e in zip(got["predictions"], expected["predictions"]):
        assert list(g) == list(e)
        assert g["probabilities"] == e["probabilities"]  # shortest round-trip floats: exact
        assert list(g["concept_scores"]) == list(e["concept_scores"])
        for name, v in e["concept_scores"].items():
            assert np.float32(g["concept_scores"][name]) == v  # float32 written as float32
        assert {k: g[k] for k in ("request_id", "class_index", "class")} == \
            {k: e[k] for k in ("request_id", "class_index", "class")}
        assert signer.verify(g["receipt"], now=T + 1) == e["receipt"]


def run_recorded(gw, jobs, monkeypatch, poison_rows=()):
    """``gw._run_batch(jobs)`` at time ``T``; returns (replies, the outputs of its runs, joined)."""
    original = gw.runtime.run
    runs = []

    def run(x):
        out, start = original(x), sum(len(r.logits) for r in runs)
        for r in poison_rows:
            if start <= r < start + len(x):
                out.logits[r - start, 0] = np.nan
        runs.append(out)
        return out

    monkeypatch.setattr(gw.runtime, "run", run)
    monkeypatch.setattr(gateway_module.time, "time", lambda: T)
    replies = gw._run_batch(jobs)
    return replies, Outputs.concatenate(runs)


def jobs_of(sizes, attributes=None, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        x = ((rng.random((n, 1, 8, 8), dtype=np.float32) - 0.5) / 0.25).astype(np.float32)
        out.append(_Job(x, f"{i:02d}" + "ab" * 15, attributes[i] if attributes else None))
    return out


@pytest.mark.parametrize("bundle", ["concept_bundle", "plain_bundle"])
def test_replies_match_a_reference_built_from_dicts(request, gateway_factory, bundle, monkeypatch):
    gw = gateway_factory(request.getfixturevalue(bundle))
    jobs = jobs_of([1, 5, 2, 64])
    replies, out = run_recorded(gw, jobs, monkeypatch)
    start = 0
    for job, raw in zip(jobs, replies):
        rows = slice(start, start + len(job.x))
        start += len(job.x)
        sens = out.concept_sensitivity[rows] if out.concept_sensitivity is not None else None
        scores = out.concept_scores[rows] if out.concept_scores is not None else None
        assert_same_reply(raw, reference(gw, job, out.logits[rows], scores, sens), gw.signer)
    # every row is in the store, with the receipt's class and signs, and counted once
    for job, raw in zip(jobs, replies):
        for p in json.loads(raw)["predictions"]:
            stored = gw.store.lookup(p["request_id"], gw.model_sha256, now=T + 1)
            signed = gw.signer.verify(p["receipt"], now=T + 1)
            assert (stored.class_index, stored.concept_signs) == (signed.class_index, signed.concept_signs)
    counted = sum(gw.metrics.registry.get_sample_value("hansgate_predictions_total", {"class": c})
                  for c in gw.manifest.classes)
    assert counted == 72


def test_attributes_and_non_finite_rows_in_one_batch(gateway_factory, concept_bundle, monkeypatch):
    """A request whose rows give NaN is refused alone; per-row attributes are signed into receipts."""
    gw = gateway_factory(concept_bundle)
    attrs = [None, [{"site": "A"}, {"site": "B", "stroke": "thin"}, {}], None]
    jobs = jobs_of([2, 3, 4], attrs, seed=1)
    replies, out = run_recorded(gw, jobs, monkeypatch, poison_rows=[6])  # a row of the third request
    assert isinstance(replies[2], RequestError) and replies[2].reason == "non_finite_output"
    assert_same_reply(replies[0], reference(gw, jobs[0], out.logits[:2], out.concept_scores[:2],
                                            out.concept_sensitivity[:2]), gw.signer)
    assert_same_reply(replies[1], reference(gw, jobs[1], out.logits[2:5], out.concept_scores[2:5],
                                            out.concept_sensitivity[2:5]), gw.signer)
    receipt = json.loads(replies[1])["predictions"][1]["receipt"]
    assert gw.signer.verify(receipt, now=T + 1).attributes == "site=B,stroke=thin"
    counted = sum(gw.metrics.registry.get_sample_value("hansgate_predictions_total", {"class": c})
                  for c in gw.manifest.classes)
    assert counted == 5
    with pytest.raises(RequestError):
        gw.store.lookup(f"{jobs[2].request_id}-0", gw.model_sha256, now=T + 1)


@pytest.mark.parametrize("concepts", [["stamp"], ["stripes", "stamp"]])
@pytest.mark.parametrize("monitoring", [True, False])
def test_every_row_is_answered_with_a_receipt_that_verifies(gateway_factory, tmp_path, concepts, monitoring):
    """With one concept and monitoring off the signs string is empty: rows were sliced out of it, so every reply
    had no predictions at all (and, once receipts were padded, the batch failed)."""
    from tests.service.bundles import make_bundle

    gw = gateway_factory(make_bundle(tmp_path / "b", concept_names=concepts).path, monitoring=monitoring)
    jobs = jobs_of([1, 3])
    replies = gw._run_batch(jobs)
    for job, raw in zip(jobs, replies):
        predictions = json.loads(raw)["predictions"]
        assert [p["request_id"] for p in predictions] == [f"{job.request_id}-{j}" for j in range(len(job.x))]
        for p in predictions:
            receipt = gw.signer.verify(p["receipt"])
            assert receipt.class_index == p["class_index"]
            assert len(receipt.concept_signs) == (len(concepts) if monitoring else 0)
            assert gw.store.lookup(p["request_id"], gw.model_sha256).concept_signs == receipt.concept_signs


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(1, 128))
def test_run_groups_copy_no_full_request_and_fill_the_others(sizes, fill):
    """Runs cover the jobs in order; a job of ``fill`` rows or more runs alone; a run of smaller jobs has fewer
    than ``fill`` rows without its last job, and reaches ``fill`` unless a full job or the end comes next."""
    groups = _run_groups(sizes, fill)
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(sizes)))
    for a, b in groups:
        if any(n >= fill for n in sizes[a:b]):
            assert b - a == 1
            continue
        assert sum(sizes[a:b - 1]) < fill
        if sum(sizes[a:b]) < fill:
            assert b == len(sizes) or sizes[b] >= fill


def test_full_requests_run_on_their_own_arrays(gateway_factory, concept_bundle, monkeypatch):
    """Two 64-row requests and a small one: onnxruntime gets each full request's own array (no copy into a
    128-row batch) and the small one alone; replies and counts are those of one joined run."""
    gw = gateway_factory(concept_bundle, microbatch_rows=64)
    jobs = jobs_of([64, 64, 3], seed=2)
    inputs = []
    original = gw.runtime.run
    monkeypatch.setattr(gw.runtime, "run", lambda x: inputs.append(x) or original(x))
    replies, out = run_recorded(gw, jobs, monkeypatch)
    assert [x is job.x for x, job in zip(inputs, jobs)] == [True, True, True] and len(inputs) == 3
    for job, raw, rows in zip(jobs, replies, [slice(0, 64), slice(64, 128), slice(128, 131)]):
        assert_same_reply(raw, reference(gw, job, out.logits[rows], out.concept_scores[rows],
                                         out.concept_sensitivity[rows]), gw.signer)
    joined = original(np.concatenate([j.x for j in jobs]))
    np.testing.assert_allclose(out.logits, joined.logits, rtol=1e-5, atol=1e-5)
    counted = sum(gw.metrics.registry.get_sample_value("hansgate_predictions_total", {"class": c})
                  for c in gw.manifest.classes)
    assert counted == 131
    assert gw.metrics.registry.get_sample_value("hansgate_batch_rows_sum") == 131
