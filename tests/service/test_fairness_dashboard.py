"""The generated fairness dashboard: up to date with its generator, every query parses (promtool) and names
only series the gateway exports or the shipped rules record."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from hansgate.service.fairness_metrics import FAIRNESS_METRIC_NAMES
from hansgate.service.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "hansgate" / "service"
DASHBOARD = SERVICE / "grafana" / "hansgate-fairness-dashboard.json"


def _exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _recorded() -> set[str]:
    names = set()
    for rules in ("rules.yml", "fairness_rules.yml"):
        for group in yaml.safe_load((SERVICE / "prometheus" / rules).read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def test_shipped_json_is_what_the_generator_writes():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fairness_dashboard.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_query_parses_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/test.sh installs Debian's prometheus"
    exprs = _exprs()
    assert len(exprs) >= 7
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    (tmp_path / "q.yml").write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "q.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_queries_name_only_exported_or_recorded_series():
    known = set(METRIC_NAMES) | FAIRNESS_METRIC_NAMES | _recorded()
    for expr in _exprs():
        for name in re.findall(r"hansgate[a-z0-9_:]*", expr):
            assert name in known, f"{name} in {expr!r} is neither exported nor recorded"
