"""The shipped Prometheus rules, scrape config and Grafana dashboard, checked with a real promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from hansgate.service.metrics import METRIC_NAMES

PROM = Path(__file__).resolve().parents[2] / "service" / "prometheus"
GRAFANA = Path(__file__).resolve().parents[2] / "service" / "grafana"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: scripts/test.sh installs Debian's "
                                                                "prometheus package")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules():
    r = promtool("check", "rules", "rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_test_rules():
    r = promtool("test", "rules", "rules_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_test_rules_catches_a_wrong_expectation(tmp_path):
    """The rule tests can fail: a wrong expected recall is reported."""
    shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")
    text = (PROM / "rules_test.yml").read_text().replace("value: 0.9\n", "value: 0.8\n", 1)
    (tmp_path / "rules_test.yml").write_text(text)
    r = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "hansgate:subgroup_recall:ratio" in r.stdout + r.stderr


@needs_promtool
def test_promtool_check_config():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def _recorded() -> set[str]:
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bhansgate[_:][A-Za-z0-9_:]+", expr))


def _exported(gateway) -> set[str]:
    from prometheus_client import generate_latest

    text = generate_latest(gateway.metrics.registry).decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_query_names_only_exported_or_recorded_metrics(gateway_factory, concept_bundle):
    gw = gateway_factory(concept_bundle)
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    gw._run_batch([type("J", (), {"x": x, "request_id": "r", "attributes": [{"site": "A"}] * len(x)})()])  # so histograms have samples
    exported = _exported(gw)
    assert {n for n in exported if n.startswith("hansgate_")} >= {n for n in METRIC_NAMES if not n.endswith("_seconds")
                                                                  and not n.endswith("_rows")}
    recorded = _recorded()
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            unknown = _names_in(r["expr"]) - exported - recorded
            assert not unknown, f"rule {r.get('record') or r.get('alert')} names {unknown}"
    dash = json.loads((GRAFANA / "hansgate-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for e in exprs:
        unknown = _names_in(e) - exported - recorded
        assert not unknown, f"dashboard query {e!r} names {unknown}"
    # and the check can fail
    assert _names_in("rate(hansgate_made_up_total[5m])") - exported - recorded


def test_grafana_provisioning_points_at_the_dashboard():
    dashboards = yaml.safe_load((GRAFANA / "provisioning-dashboards.yaml").read_text())
    assert dashboards["providers"][0]["type"] == "file"
    ds = yaml.safe_load((GRAFANA / "provisioning-datasource.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"


def test_kubernetes_example_uses_the_builtin_probes():
    docs = [d for d in yaml.safe_load_all((Path(__file__).resolve().parents[2] / "service" / "deploy" /
                                           "kubernetes.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceMonitor", "Secret"} <= kinds
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert any(e["name"] == "HANSGATE_RECEIPT_KEY" for e in c["env"])
