"""The OpenAPI document promises what the server enforces (issue 13.11): request schemas from the
manifest, and schemathesis with every check against a live loopback server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.service.live import serving

SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
# 413 is how the gateway refuses a batch over max_batch (a schema-invalid request)
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[[operations]]
include-path = "/predict"
# a schema cannot promise that a string is a decodable PNG/JPEG or a .npy file: random bytes
# in image/png, application/x-npy or a base64 "images" item are refused 400 (bad_image/bad_npy)
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]
"""


def test_request_schemas_come_from_the_manifest(gateway_factory, concept_bundle):
    from hansgate.service.app import create_app

    gw = gateway_factory(concept_bundle, max_batch=16)
    spec = create_app(lambda: gw).openapi()
    predict = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    batch, sample = predict["properties"]["tensor"]["oneOf"]
    assert batch["maxItems"] == 16 and batch["items"] == sample
    assert sample["minItems"] == sample["maxItems"] == 1 and sample["items"]["maxItems"] == 8
    number = sample["items"]["items"]["items"]
    assert (number["minimum"], number["maximum"]) == (0.0, 1.0)
    assert predict["additionalProperties"] is False and len(predict["oneOf"]) == 2
    fb = spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert fb["properties"]["label"]["enum"] == ["cat", "dog", "fox"]
    assert fb["properties"]["attributes"]["properties"]["site"]["enum"] == ["A", "B"]
    assert fb["properties"]["attributes"]["additionalProperties"] is False


@pytest.mark.parametrize("body, status", [
    ({"images": None, "tensor": np.zeros((1, 8, 8)).tolist()}, 422),  # null is not "absent"
    ({"tensor": None}, 422),
    ({"tensor": [[[[True] * 8] * 8]]}, 422),  # issue 13.12: true was read as 1.0
])
def test_what_the_schema_refuses_the_server_refuses(gateway_factory, concept_bundle, body, status):
    import jsonschema

    from tests.service.test_app import Client

    c = Client(gateway_factory(concept_bundle))
    try:
        schema = c.app.openapi()["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"][
            "schema"]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)
        r = c.post("/predict", json=body)
        assert r.status_code == status, r.text
    finally:
        c.close()


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("st") is None, reason="schemathesis is in the dev extra")
def test_schemathesis_all_checks_pass(gateway_factory, concept_bundle, tmp_path):
    gw = gateway_factory(concept_bundle, max_batch=4, max_body_bytes=64 * 1024)
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(SCHEMATHESIS_CONFIG)
    with serving(gw) as base:
        assert httpx.get(base + "/openapi.json").status_code == 200
        proc = subprocess.run(
            [shutil.which("st") or "st", "--no-color", "--config-file", str(cfg), "run", f"{base}/openapi.json", "--checks", "all",
             "--max-examples", "25", "--seed", "13", "--workers", "1", "--include-method", "POST"],
            capture_output=True, text=True, timeout=280, cwd=tmp_path,
            env=dict(os.environ, SCHEMATHESIS_HOOKS="", PYTHONPATH=os.pathsep.join(sys.path)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "No issues found" in out or "passed" in out.lower(), out[-3000:]
