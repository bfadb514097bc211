"""Live fairness in the gateway (issue 15): attributes at prediction time, selection counts equal to the
client's own tally, receipts that carry attributes, and the calibrated label-free recall estimate."""

from __future__ import annotations

import numpy as np
import pytest

from hansgate.manifest import CalibrationSpec
from tests.service.bundles import make_bundle
from tests.service.test_app import Client, npy

CAL = CalibrationSpec(temperature=2.0, ece_before=0.1, ece_after=0.02, nll_before=1.0, nll_after=0.9,
                      samples=100, bins=15)


@pytest.fixture(scope="module")
def calibrated_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("cal") / "b", calibration=CAL).path


@pytest.fixture
def client(gateway_factory, calibrated_bundle):
    c = Client(gateway_factory(calibrated_bundle, max_batch=64, min_samples=5))
    yield c
    c.close()


def _rows(n: int, seed: int) -> list:
    return np.random.default_rng(seed).random((n, 1, 8, 8)).tolist()


def test_selection_equals_the_clients_tally_and_ratio(client):
    rng = np.random.default_rng(0)
    tally: dict[tuple[str, str], int] = {}
    totals = {"A": 0, "B": 0}
    for i in range(6):
        sites = [str(rng.choice(["A", "B"])) for _ in range(8)]
        r = client.post("/predict", json={"tensor": _rows(8, i), "attributes": [{"site": s} for s in sites]})
        assert r.status_code == 200, r.text
        for site, p in zip(sites, r.json()["predictions"]):
            tally[(site, p["class"])] = tally.get((site, p["class"]), 0) + 1
            totals[site] += 1
    r = client.post("/predict", content=npy(np.random.default_rng(9).random((3, 1, 8, 8), dtype=np.float32)),
                    headers={"content-type": "application/x-npy", "x-hansgate-attributes": "site=B, stroke=thin"})
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        tally[("B", p["class"])] = tally.get(("B", p["class"]), 0) + 1
    totals["B"] += 3
    snap = client.get("/compliance").json()
    site = [e for e in snap["selection"] if e["attribute"] == "site"]
    assert len(site) == 2 * len(client.gw.manifest.classes)
    for e in site:
        assert e["predicted"] == tally.get((e["value"], e["class"]), 0) and e["total"] == totals[e["value"]]
        rates = {v: tally.get((v, e["class"]), 0) / totals[v] for v in ("A", "B")}
        top = max(rates.values())
        assert e["ratio_to_max"] == (pytest.approx(rates[e["value"]] / top) if top else None)
    thin = next(e for e in snap["selection"] if e["attribute"] == "stroke" and e["value"] == "thin")
    assert thin["total"] == 3 and "few_samples" in thin["flags"]


def test_receipt_carries_attributes_into_feedback(client):
    p = client.post("/predict", json={"tensor": _rows(1, 5), "attributes": {"site": "B"}}).json()["predictions"][0]
    r = client.post("/feedback", json={"receipt": p["receipt"], "label": p["class"]})
    assert r.status_code == 200 and r.json()["attributes"] == {"site": "B"}
    assert client.gw.metrics.registry.get_sample_value(
        "hansgate_feedback_total", {"class": p["class"], "attribute": "site", "value": "B", "outcome": "tp"}) == 1


def test_estimated_recall_from_calibrated_probabilities(client):
    x = np.random.default_rng(3).random((40, 1, 8, 8))
    r = client.post("/predict", json={"tensor": x.tolist(), "attributes": {"site": "A"}})
    preds = r.json()["predictions"]
    logits = np.log(np.asarray([p["probabilities"] for p in preds]))  # softmax inverted up to a constant
    calibrated = np.exp(logits / CAL.temperature)
    calibrated /= calibrated.sum(1, keepdims=True)
    pred = calibrated.argmax(1)
    snap = client.get("/compliance").json()
    for k, cls in enumerate(client.gw.manifest.classes):
        tp, fn = calibrated[pred == k, k].sum(), calibrated[pred != k, k].sum()
        e = next(e for e in snap["estimated"] if (e["attribute"], e["value"], e["class"]) == ("site", "A", cls))
        assert e["estimated_recall"] == pytest.approx(tp / (tp + fn), rel=1e-4)
        assert e["realized_recall"] is None and e["labelled"] == 0
    assert snap["calibration"]["temperature"] == CAL.temperature


VECTOR = CalibrationSpec(temperature=2.0, ece_before=0.1, ece_after=0.02, nll_before=1.0, nll_after=0.9,
                         samples=100, bins=15, family="vector", scales=[0.3, 1.0, 3.0], biases=[1.0, 0.0, -1.0],
                         penalty=0.01, objective="nll")


def test_estimated_recall_applies_the_bundles_per_class_scales_and_biases(gateway_factory, tmp_path):
    """A vector-scaled bundle: expected tp/fn come from ``softmax(scales * logits + biases)`` over the served
    (raw argmax) predictions, which no single temperature reproduces here."""
    import onnxruntime as ort

    bundle = make_bundle(tmp_path / "v", calibration=VECTOR)
    c = Client(gateway_factory(bundle.path, max_batch=64, min_samples=5))
    try:
        rng = np.random.default_rng(4)
        # brighter and darker rows (the bundle normalises by mean 0.5, std 0.25): two classes predicted
        x = 0.5 + 0.25 * np.concatenate([rng.random((30, 1, 8, 8)), rng.random((30, 1, 8, 8)) ** 3])
        preds = c.post("/predict", json={"tensor": x.tolist(), "attributes": {"site": "B"}}).json()["predictions"]
        # the logits themselves (unequal scales do not commute with softmax's row constant): the graph on the
        # normalised input, as the gateway runs it
        session = ort.InferenceSession(str(bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
        spec = bundle.manifest.input
        feed = ((x - spec.mean[0]) / spec.std[0]).astype(np.float32)
        logits = session.run(["logits"], {session.get_inputs()[0].name: feed})[0].astype(np.float64)
        pred = np.asarray([p["class_index"] for p in preds])
        assert (pred == logits.argmax(1)).all() and len(set(pred)) > 1
        z = logits * np.asarray(VECTOR.scales) + np.asarray(VECTOR.biases)
        vector = np.exp(z - z.max(1, keepdims=True))
        vector /= vector.sum(1, keepdims=True)
        tempered = np.exp(logits / VECTOR.temperature)
        tempered /= tempered.sum(1, keepdims=True)
        snap = c.get("/compliance").json()
        moved = 0.0
        for k, cls in enumerate(c.gw.manifest.classes):
            e = next(e for e in snap["estimated"] if (e["attribute"], e["value"], e["class"]) == ("site", "B", cls))
            tp, fn = vector[pred == k, k].sum(), vector[pred != k, k].sum()
            if tp + fn == 0:
                continue
            assert e["estimated_recall"] == pytest.approx(tp / (tp + fn), rel=1e-4)
            tp_t, fn_t = tempered[pred == k, k].sum(), tempered[pred != k, k].sum()
            moved = max(moved, abs(e["estimated_recall"] - tp_t / (tp_t + fn_t)))
        assert moved > 0.01
        assert snap["calibration"]["family"] == "vector" and snap["calibration"]["scales"] == VECTOR.scales
    finally:
        c.close()


@pytest.mark.parametrize("attributes, status, reason", [
    ({"sex": "f"}, 422, "unknown_attribute"),
    ({"site": "C"}, 422, "unknown_value"),
    ([{"site": "A"}] * 3, 400, "bad_request"),
])
def test_undeclared_or_misshapen_attributes_are_refused(client, attributes, status, reason):
    r = client.post("/predict", json={"tensor": _rows(2, 1), "attributes": attributes})
    assert r.status_code == status and r.json()["error"] == reason
    r = client.post("/predict", content=npy(np.zeros((1, 1, 8, 8), np.float32)),
                    headers={"content-type": "application/x-npy", "x-hansgate-attributes": "site=Z"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_value"
    assert client.gw.metrics.registry.get_sample_value(
        "hansgate_subgroup_predictions_total", {"attribute": "site", "value": "A", "class": "cat"}) == 0


def test_html_snapshot_shows_the_same_figures(client):
    client.post("/predict", json={"tensor": _rows(6, 2), "attributes": {"site": "A"}})
    snap = client.get("/compliance").json()
    html = client.get("/compliance", headers={"accept": "text/html"}).text
    assert "four-fifths rule" in html and "estimated before labels" in html
    for e in snap["selection"]:
        if e["rate"] is not None:
            assert f"<td>{e['predicted']}</td><td>{e['total']}</td>\n<td>{e['rate']:.3f}</td>" in html
    for e in snap["estimated"]:
        if e["estimated_recall"] is not None:
            assert f"<td>{e['estimated_recall']:.3f}</td>" in html
