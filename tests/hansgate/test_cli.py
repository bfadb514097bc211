"""The CLI contract of issue 2: ``hansgate demo`` outputs and ``hansgate refine`` on user files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hansgate.bundle import load_bundle
from hansgate.cli import main


def test_demo_writes_the_contracted_files(demo_dir):
    assert (demo_dir / "bundle" / "model.onnx").is_file()
    assert (demo_dir / "bundle" / "manifest.json").is_file()
    results = json.loads((demo_dir / "results.json").read_text())
    # the shortcut is real: the original model loses accuracy once the artifact is everywhere
    assert results["original"]["clean_acc"] - results["original"]["poisoned_acc"] > 0.15
    # and the refined models close part of that gap (the demo's claim), without losing clean accuracy
    for method in ("pca-egem", "rgem"):
        assert results[method]["poisoned_acc"] > results["original"]["poisoned_acc"] + 0.05, method
        assert results[method]["clean_acc"] > results["original"]["clean_acc"] - 0.1, method
    table = (demo_dir / "results.md").read_text()
    for method in ("original", "pca-egem", "rgem"):  # one table row per method, with its figures
        row = next(ln for ln in table.splitlines() if ln.lower().startswith(f"| {method}"))
        assert f"{results[method]['poisoned_acc']:.3f}" in row, row
    assert (demo_dir / "results.png").stat().st_size > 5000
    load_bundle(demo_dir / "bundle")


def test_refine_command_on_user_files(demo_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = main(["refine", "--model", "small_vgg", "--weights", str(demo_dir / "source_model.safetensors"),
               "--data", str(demo_dir / "data" / "refine.npz"), "--method", "egem",
               "--test-data", str(demo_dir / "data" / "test.npz"),
               "--poisoned-data", str(demo_dir / "data" / "test_poisoned.npz"), "--out", str(out), "--quiet"])
    assert rc == 0
    manifest = load_bundle(out).manifest
    assert manifest.method.name == "egem"
    assert manifest.evaluation.after["poisoned_acc"] > manifest.evaluation.before["poisoned_acc"]
    assert manifest.source_model.weights.endswith("source_model.safetensors")
    assert "bundle written" in capsys.readouterr().out
    assert not manifest.input.normalization_in_graph and manifest.input.mean == [0.0]
    from safetensors.torch import load_file

    from hansgate.nn.models import state_dict_sha256

    assert manifest.source_model.sha256 == state_dict_sha256(load_file(str(demo_dir / "source_model.safetensors")))


def _bad_inputs(demo_dir, tmp_path):
    weights = str(demo_dir / "source_model.safetensors")
    data = str(demo_dir / "data" / "refine.npz")
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((12, 1, 20, 20), np.float32), y=np.arange(12) % 10)
    return [
        (["--model", "small_vgg", "--data", str(tmp_path / "missing.npz")], "data not found"),
        (["--model", "small_vgg", "--weights", weights, "--data", data, "--method", "nope"], "unknown refinement"),
        (["--model", "mnist_cnn", "--weights", weights, "--data", data], "do not fit"),
        (["--model", "small_vgg", "--weights", weights, "--data", str(small)], "do not fit"),
        (["--model", "tests.refinement._factory:tiny", "--data", data], "does not run"),
        (["--model", "small_vgg", "--weights", weights, "--data", data, "--layers", "features.77"], "no module"),
    ]


def test_bad_input_gives_one_error_line_and_no_bundle(demo_dir, tmp_path, capsys):
    for args, message in _bad_inputs(demo_dir, tmp_path):
        out = tmp_path / "never"
        assert main(["refine", *args, "--out", str(out), "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hansgate: error:") and message in err[0], (args, err)
        assert not out.exists()


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "hansgate.cli", "--help"], capture_output=True, text=True,
                          check=True)
    from hansgate.cli import COMMANDS

    for command in COMMANDS:
        assert command in proc.stdout


@pytest.mark.parametrize("argv", [["demo", "--out", "x", "--seeds", "0"],
                                  ["demo", "--out", "x", "--methods", "egem", "--bundle-method", "rgem"]])
def test_demo_option_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("hansgate: error:")
    assert not (tmp_path / "x").exists()
