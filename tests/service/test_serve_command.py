"""``hansgate serve`` (hansgate/commands/serve.py) and ``bentoml build`` of bentofile.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hansgate.cli import build_parser, main
from hansgate.commands.serve import command

ROOT = Path(__file__).resolve().parents[2]


def test_parser_and_command_line(concept_bundle):
    args = build_parser().parse_args(["serve", str(concept_bundle), "--port", "3111", "--workers", "3"])
    assert (args.port, args.workers) == (3111, 3)
    argv, env = command(concept_bundle, 3111, "127.0.0.1", 3)
    assert argv[1:5] == ["-m", "bentoml", "serve", "hansgate.service.service:Gateway"] and "3111" in argv
    assert env["HANSGATE_BUNDLE"] == str(concept_bundle.resolve()) and env["HANSGATE_WORKERS"] == "3"


def test_bad_bundle_is_refused_before_any_worker_starts(concept_bundle, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(concept_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["graph"]["sha256"] = "f" * 64
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["serve", str(bad), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0]
    manifest["schema_version"] = "9.9"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["serve", str(bad)]) == 2
    assert "schema version" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(concept_bundle), "--workers", "0"]) == 2


def test_worker_refuses_a_bad_bundle_with_one_line(tmp_path):
    """``bentoml serve`` without the CLI: the service class's constructor raises the BundleError."""
    code = ("import sys\nfrom hansgate.errors import BundleError\nfrom hansgate.service.config import GatewayConfig\n"
            "from hansgate.service.gateway import Gateway\n"
            "try:\n    Gateway(GatewayConfig.from_env())\nexcept BundleError as e:\n    print(e); sys.exit(3)\n")
    env = dict(os.environ, HANSGATE_BUNDLE=str(tmp_path / "nope"), HANSGATE_STATE_DIR=str(tmp_path / "s"))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "bundle directory not found" in r.stdout


def test_bentoml_build(tmp_path):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "home"), BENTOML_DO_NOT_TRACK="True")
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hansgate:" in r.stdout
    bento = next(p for p in (tmp_path / "home" / "bentos" / "hansgate").iterdir() if p.is_dir())
    assert (bento / "src" / "hansgate" / "service" / "service.py").is_file()
    assert (bento / "src" / "hansgate" / "audit" / "compliance.py").is_file()
    assert (bento / "src" / "hansgate" / "service" / "templates" / "compliance.html").is_file()
