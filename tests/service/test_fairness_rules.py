"""The shipped fairness rules with a real promtool: the four-fifths alert fires, stays silent under the
minimum-sample guard, and the equalized-odds alert fires (cases in fairness_rules_test.yml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

PROM = Path(__file__).resolve().parents[2] / "hansgate" / "service" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/test.sh installs Debian's prometheus"
    return subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=120)


def test_fairness_rules_check_and_unit_tests_pass():
    checked = _promtool("check", "rules", "fairness_rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "fairness_rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_unit_tests_cover_firing_guarded_and_equalized_odds():
    cases = yaml.safe_load((PROM / "fairness_rules_test.yml").read_text())["tests"]
    alerts = [(t["alertname"], bool(t["exp_alerts"])) for c in cases for t in c.get("alert_rule_test", [])]
    assert ("HansgateDisparateImpact", True) in alerts and ("HansgateDisparateImpact", False) in alerts
    assert ("HansgateEqualizedOddsGap", True) in alerts
