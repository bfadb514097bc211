"""hansgate.service.app over HTTP (in-process ASGI): routes, every bad input, counted refusals, OpenAPI fuzz."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hansgate.service.app import create_app


class Client:
    """A synchronous facade over httpx's ASGI transport (one event loop for the gateway's batcher)."""

    def __init__(self, gw):
        self.gw = gw
        self.app = create_app(lambda: gw)
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gw")

    def __getattr__(self, method):
        def call(*args, **kw):
            return self.loop.run_until_complete(getattr(self.http, method)(*args, **kw))
        return call

    def gather(self, coros):
        async def all_():
            return await asyncio.gather(*coros)
        return self.loop.run_until_complete(all_())

    def close(self):
        self.loop.run_until_complete(self.gw.batcher.aclose())
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


@pytest.fixture
def client(gateway_factory, concept_bundle):
    c = Client(gateway_factory(concept_bundle, max_batch=16, max_body_bytes=64 * 1024))
    yield c
    c.close()


def counter(gw, name, **labels):
    v = gw.metrics.registry.get_sample_value(name, labels)
    return 0 if v is None else int(v)


def rejected(gw, route, reason):
    return counter(gw, "hansgate_rejected_requests_total", route=route, reason=reason)


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def png(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_forms_agree_and_carry_what_the_issue_asks(client):
    gw = client.gw
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    a = client.post("/predict", json={"tensor": x.tolist()}).json()
    b = client.post("/predict", content=npy(x), headers={"content-type": "application/x-npy"}).json()
    for pa, pb in zip(a["predictions"], b["predictions"]):
        assert pa["class"] == pb["class"]
        np.testing.assert_allclose(pa["probabilities"], pb["probabilities"], rtol=1e-6)
    p = a["predictions"][0]
    assert a["model_sha256"] == gw.model_sha256 and p["request_id"].startswith(a["request_id"])
    assert set(p["concept_scores"]) == {"stripes", "stamp"} and sum(p["probabilities"]) == pytest.approx(1.0)
    assert p["class"] == gw.manifest.classes[int(np.argmax(p["probabilities"]))]
    one = client.post("/predict", content=png(), headers={"content-type": "image/png"}).json()
    many = client.post("/predict", json={"images": [base64.b64encode(png()).decode()] * 2}).json()
    assert len(one["predictions"]) == 1 and len(many["predictions"]) == 2
    assert one["predictions"][0]["probabilities"] == pytest.approx(many["predictions"][1]["probabilities"])
    assert counter(gw, "hansgate_predictions_total", **{"class": p["class"]}) >= 1
    assert sum(counter(gw, "hansgate_predictions_total", **{"class": c}) for c in gw.manifest.classes) == 9


def test_concurrent_requests_are_batched_and_answered_individually(client):
    xs = [np.full((1, 1, 8, 8), i / 40, np.float32) for i in range(40)]
    outs = client.gather([client.http.post("/predict", json={"tensor": x.tolist()}) for x in xs])
    single = [client.post("/predict", json={"tensor": x.tolist()}).json() for x in xs[:5]]
    for o, s in zip(outs, single):
        assert o.json()["predictions"][0]["probabilities"] == pytest.approx(s["predictions"][0]["probabilities"])
    assert client.gw.batcher.batches_ < 40 + 5


@pytest.mark.parametrize("kwargs, status, reason", [
    ({"json": {"tensor": np.zeros((1, 1, 7, 8)).tolist()}}, 422, "shape"),
    ({"content": npy(np.zeros((1, 1, 8, 8), np.float64)), "headers": {"content-type": "application/x-npy"}},
     422, "dtype"),
    ({"json": {"tensor": [[["NaN"] * 8] * 8]}}, 422, "dtype"),
    ({"content": b'{"tensor": [[' + b",".join([b"[NaN, 0, 0, 0, 0, 0, 0, 0]"] * 8) + b"]]}",
      "headers": {"content-type": "application/json"}}, 422, "non_finite"),
    ({"content": npy(np.full((1, 1, 8, 8), np.inf, np.float32)), "headers": {"content-type": "application/x-npy"}},
     422, "non_finite"),
    ({"json": {"tensor": []}}, 422, "empty_batch"),
    ({"json": {"tensor": np.zeros((17, 1, 8, 8)).tolist()}}, 413, "batch_too_large"),
    ({"content": b"\0" * (65 * 1024), "headers": {"content-type": "application/x-npy"}}, 413, "body_too_large"),
    ({"content": b"\x89PNG\r\n\x1a\nbroken", "headers": {"content-type": "image/png"}}, 400, "bad_image"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"json": {"tensor": [1], "images": ["x"]}}, 422, "invalid"),
    ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    ({"content": b'{"tensor": ' + b"[" * 40 + b"]" * 40 + b"}", "headers": {"content-type": "application/json"}},
     422, "invalid"),  # nested deeper than a tensor can be: refused before parsing
    ({"content": b"[" * (70 * 1024), "headers": {"content-type": "application/json"}}, 413, "body_too_large"),
])
def test_bad_predict_input_is_refused_and_counted(client, kwargs, status, reason):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"] == reason and "\n" not in r.json()["detail"]
    assert rejected(client.gw, "predict", reason) == 1
    assert client.post("/predict", json={"tensor": np.zeros((1, 8, 8)).tolist()}).status_code == 200  # still serving


def _predict(client, n=1):
    return client.post("/predict", json={"tensor": np.random.default_rng(n).random((n, 1, 8, 8)).tolist()}).json()


def test_feedback_counts_outcomes_per_subgroup(client):
    gw = client.gw
    preds = _predict(client, 4)["predictions"]
    truth = ["cat", "dog", "fox", "cat"]
    for p, label in zip(preds, truth):
        r = client.post("/feedback", json={"receipt": p["receipt"], "label": label, "attributes": {"site": "B"}})
        assert r.status_code == 200 and r.json()["correct"] == (p["class"] == label)
    for cls in gw.manifest.classes:
        tp = sum(p["class"] == cls and t == cls for p, t in zip(preds, truth))
        fn = sum(p["class"] != cls and t == cls for p, t in zip(preds, truth))
        fp = sum(p["class"] == cls and t != cls for p, t in zip(preds, truth))
        for attr, val in [("_all", "_all"), ("site", "B")]:
            labels = {"class": cls, "attribute": attr, "value": val}
            assert counter(gw, "hansgate_feedback_total", outcome="tp", **labels) == tp
            assert counter(gw, "hansgate_feedback_total", outcome="fn", **labels) == fn
            assert counter(gw, "hansgate_feedback_total", outcome="fp", **labels) == fp
            assert counter(gw, "hansgate_feedback_total", outcome="tn", **labels) == 4 - tp - fn - fp
    snap = client.get("/compliance").json()
    row = next(r for r in snap["subgroups"] if r["attribute"] == "site" and r["value"] == "B" and r["class"] == "cat")
    assert row["recall"]["n"] == 2 and snap["feedback"] == 4
    assert "Compliance snapshot" in client.get("/compliance", headers={"accept": "text/html"}).text
    assert client.get("/compliance.html").headers["content-type"].startswith("text/html")


def test_feedback_refusals(client, tmp_path):
    gw = client.gw
    p = _predict(client)["predictions"][0]
    cases = [
        ({"receipt": p["receipt"], "label": "wolf"}, 422, "unknown_label"),
        ({"receipt": p["receipt"], "label": "cat", "attributes": {"age": "old"}}, 422, "unknown_attribute"),
        ({"receipt": p["receipt"], "label": "cat", "attributes": {"site": "Z"}}, 422, "unknown_value"),
        ({"receipt": p["receipt"][:-4] + "AAAA", "label": "cat"}, 403, "forged_receipt"),
        ({"request_id": "0" * 32 + "-0", "label": "cat"}, 404, "unknown_request"),
        ({"label": "cat"}, 422, "invalid"),
    ]
    for body, status, reason in cases:
        r = client.post("/feedback", json=body)
        assert (r.status_code, r.json()["error"]) == (status, reason), r.text
        assert rejected(gw, "feedback", reason) == 1
        assert counter(gw, "hansgate_feedback_requests_total", result=reason) == 1
    # by request id (the store), then a duplicate by receipt: the first label counts, the second is refused
    assert client.post("/feedback", json={"request_id": p["request_id"], "label": "cat"}).status_code == 200
    r = client.post("/feedback", json={"receipt": p["receipt"], "label": "dog"})
    assert (r.status_code, r.json()["error"]) == (409, "duplicate_feedback")
    assert counter(gw, "hansgate_feedback_total", outcome="tp", attribute="_all", value="_all", **{"class": "cat"}) \
        + counter(gw, "hansgate_feedback_total", outcome="fn", attribute="_all", value="_all", **{"class": "cat"}) == 1
    # unknown attribute values never become labels
    labels = {s.labels.get("value") for f in gw.metrics.registry.collect() for s in f.samples}
    assert "Z" not in labels and "old" not in labels


def test_expired_receipt(gateway_factory, concept_bundle):
    c = Client(gateway_factory(concept_bundle, receipt_ttl_s=0.001))
    try:
        p = _predict(c)["predictions"][0]
        import time

        time.sleep(0.01)
        r = c.post("/feedback", json={"receipt": p["receipt"], "label": "cat"})
        assert (r.status_code, r.json()["error"]) == (410, "expired")
    finally:
        c.close()


def test_bundle_without_concepts(gateway_factory, plain_bundle):
    c = Client(gateway_factory(plain_bundle))
    try:
        p = _predict(c, 2)["predictions"][0]
        assert p["concept_scores"] == {}
        assert c.get("/compliance").json()["tcav"] == []
    finally:
        c.close()


def test_monitoring_off_skips_concepts_but_predicts_the_same(gateway_factory, concept_bundle):
    on, off = Client(gateway_factory(concept_bundle)), Client(gateway_factory(concept_bundle, monitoring=False))
    try:
        x = {"tensor": np.random.default_rng(3).random((2, 1, 8, 8)).tolist()}
        a, b = on.post("/predict", json=x).json(), off.post("/predict", json=x).json()
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert counter(off.gw, "hansgate_predictions_total", **{"class": "cat"}) == 0
    finally:
        on.close()
        off.close()


def test_openapi_documents_the_routes(client):
    spec = client.app.openapi()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "image/png", "image/jpeg", "application/x-npy"} <= set(body)
    assert "receipt" in spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]
    assert {"200", "413", "422"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    assert "/compliance" in spec["paths"]


json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=20)
_BODY_STRATEGIES: dict[str, st.SearchStrategy] = {}


def _bodies(routes: dict[str, dict]) -> st.SearchStrategy:
    """One strategy object per set of schemas, built once: building it inside ``data.draw`` made hypothesis
    see a new strategy definition on every replay (FlakyStrategyDefinition)."""
    import json

    from hypothesis_jsonschema import from_schema

    key = json.dumps(routes, sort_keys=True)
    if key not in _BODY_STRATEGIES:
        _BODY_STRATEGIES[key] = st.one_of(*[st.tuples(st.just(r), from_schema(schema) | json_values)
                                            for r, schema in routes.items()])
    return _BODY_STRATEGIES[key]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_from_openapi_finds_no_5xx(client, data):
    """Bodies drawn from the OpenAPI document's own schemas (hypothesis-jsonschema) and arbitrary JSON."""
    spec = client.app.openapi()
    routes = {r: spec["paths"][r]["post"]["requestBody"]["content"]["application/json"]["schema"]
              for r in ("/predict", "/feedback")}
    route, body = data.draw(_bodies(routes))
    r = client.post(route, json=body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()) == {"error", "detail"}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=2048), kind=st.sampled_from(["image/png", "image/jpeg", "application/x-npy",
                                                          "application/json", "application/octet-stream"]))
def test_fuzz_raw_bodies_find_no_5xx(client, raw, kind):
    r = client.post("/predict", content=raw, headers={"content-type": kind})
    assert 400 <= r.status_code < 500


def test_non_finite_outputs_are_refused_not_counted(client, monkeypatch):
    """Issue 13.5: the graph's NaN reached the reply (invalid JSON) and counted as a prediction."""
    gw = client.gw
    original = gw.runtime.run

    def poisoned(x):
        out = original(x)
        bad = np.isclose(x[:, 0, 0, 0], (0.9 - 0.5) / 0.25)  # rows sent with value 0.9 give NaN logits
        out.logits[bad] = np.nan
        return out

    monkeypatch.setattr(gw.runtime, "run", poisoned)
    xs = [np.full((2, 1, 8, 8), v, np.float32) for v in (0.1, 0.9, 0.3)]
    outs = client.gather([client.http.post("/predict", json={"tensor": x.tolist()}) for x in xs])
    assert [o.status_code for o in outs] == [200, 422, 200]
    assert outs[1].json()["error"] == "non_finite_output" and "NaN" not in outs[0].text
    assert sum(counter(gw, "hansgate_predictions_total", **{"class": c}) for c in gw.manifest.classes) == 4
    assert rejected(gw, "predict", "non_finite_output") == 1


def test_signed_receipt_with_a_class_out_of_range_is_refused_before_counting(client):
    """Issue 13.10: class 99 gave 500 after being counted, class -1 counted as the last class."""
    from tests.service.test_receipts import _signed_payload

    gw = client.gw
    for cls in (99, -1, 3):
        token = _signed_payload(gw.signer, {"r": f"abc-{cls}", "c": cls, "m": gw.model_sha256, "s": "++",
                                            "t": __import__("time").time()})
        r = client.post("/feedback", json={"receipt": token, "label": "cat"})
        assert (r.status_code, r.json()["error"]) == (403, "forged_receipt"), r.text
    assert counter(gw, "hansgate_feedback_requests_total", result="accepted") == 0
    assert rejected(gw, "feedback", "forged_receipt") == 3


def test_error_details_never_carry_object_addresses(client):
    """Issue 13.12: '<_io.BytesIO object at 0x...>' was in the reply; a 5-byte .npy was 'pickled data'."""
    r = client.post("/predict", content=b"hello", headers={"content-type": "image/png"})
    assert r.status_code == 400 and "0x" not in r.text and "BytesIO" not in r.text
    r = client.post("/predict", content=b"\x93NUMP", headers={"content-type": "application/x-npy"})
    assert (r.status_code, r.json()["error"]) == (400, "bad_npy") and "pickle" not in r.text


def test_huge_npy_header_is_a_counted_refusal(client):
    """Issue 13.6: a header claiming a huge shape gave an uncaught MemoryError (500, uncounted)."""
    from tests.service.test_inputs import npy_with_header

    r = client.post("/predict", content=npy_with_header((2**40, 1, 8, 8)),
                    headers={"content-type": "application/x-npy"})
    assert (r.status_code, r.json()["error"]) == (413, "batch_too_large")
    r = client.post("/predict", content=npy_with_header((1, 1, 2**20, 2**20)),
                    headers={"content-type": "application/x-npy"})
    assert (r.status_code, r.json()["error"]) == (422, "shape")
    assert rejected(client.gw, "predict", "batch_too_large") == 1


def test_large_bodies_are_decoded_off_the_event_loop(client, monkeypatch):
    """Issue 13.3: decoding blocked the loop; images and large bodies now go to the decode pool."""
    import threading

    seen = []
    pre = client.gw.preprocessor
    original = pre.from_images

    def spy(files):
        seen.append(threading.current_thread().name)
        return original(files)

    monkeypatch.setattr(pre, "from_images", spy)
    assert client.post("/predict", content=png(), headers={"content-type": "image/png"}).status_code == 200
    assert seen and seen[0].startswith("hansgate-decode")
