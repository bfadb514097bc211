"""The CLI contract of issue 2: ``hansgate demo`` outputs and ``hansgate refine`` on user files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hansgate.bundle import load_bundle
from hansgate.cli import main
from tests.grey_models import self_labelled_grey


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


# --- hansgate refine: guards that speak, signing as it writes (issue 12 item 4, issue 13 item 7) ----------------

GUARD_MEAN, GUARD_STD = 0.3, 0.2


@pytest.fixture(scope="module")
def guard_files(tmp_path_factory):
    """Random grey images and a random mnist_cnn; labels the model's own (normalised) predictions."""
    import torch

    from hansgate.nn.normalisation import Normalised

    root = tmp_path_factory.mktemp("guards")
    model, x, y = self_labelled_grey(root, 60, GUARD_MEAN, GUARD_STD)
    with torch.no_grad():
        y_bad_norm = Normalised(model, [0.5], [0.01])(x).argmax(1)
        y_dim = Normalised(model, [GUARD_MEAN], [GUARD_STD])(x * 0.05).argmax(1)
    classes = np.array(["a", "b", "c"])
    np.savez(root / "right.npz", x=x.numpy(), y=y.numpy(), classes=classes)
    wrong = y.clone()
    wrong[: 2 * len(y) // 3] = (wrong[: 2 * len(y) // 3] + 1) % 3  # a third right: below 0.5, near chance
    np.savez(root / "wrong.npz", x=x.numpy(), y=wrong.numpy(), classes=classes)
    np.savez(root / "bad_norm.npz", x=x.numpy(), y=y_bad_norm.numpy(), classes=classes)
    np.savez(root / "dim.npz", x=(x * 0.05).numpy(), y=y_dim.numpy(), classes=classes)
    return root


def _refine(root, data, out, *extra, norm=(GUARD_MEAN, GUARD_STD)):
    return main(["refine", "--model", "mnist_cnn", "--weights", str(root / "w.safetensors"), "--data",
                 str(root / data), "--method", "rgem", "--mean", str(norm[0]), "--std", str(norm[1]),
                 "--calibration-share", "0", "--out", str(out), "--quiet", *extra])


def test_low_verified_share_is_refused_in_one_line_unless_forced(guard_files, tmp_path, capsys):
    assert _refine(guard_files, "wrong.npz", tmp_path / "b") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predicted correctly" in err[0] and "--force" in err[0] and "--image-size" in err[0]
    assert not (tmp_path / "b").exists()
    assert _refine(guard_files, "wrong.npz", tmp_path / "b", "--force") == 0
    captured = capsys.readouterr()
    assert "refining anyway (--force)" in captured.err
    summary = json.loads(captured.out[:captured.out.rindex("}") + 1])
    assert summary["verified_share"] == pytest.approx(1 / 3, abs=0.02)


def test_near_chance_accuracy_is_refused_even_below_the_share_threshold(guard_files, tmp_path, capsys):
    assert _refine(guard_files, "wrong.npz", tmp_path / "b", "--min-verified-share", "0.2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "near chance for 3 classes" in err[0] and "--force" in err[0]


def test_verified_share_is_reported_and_recorded(guard_files, tmp_path, capsys):
    assert _refine(guard_files, "right.npz", tmp_path / "b") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[:captured.out.rindex("}") + 1])
    assert summary["verified_share"] == 1.0 and "warning" not in captured.err
    manifest = load_bundle(tmp_path / "b").manifest
    assert manifest.verified_share == 1.0


def test_pixels_that_contradict_the_normalisation_are_warned_about(guard_files, tmp_path, capsys):
    assert _refine(guard_files, "bad_norm.npz", tmp_path / "b", norm=(0.5, 0.01)) == 0
    err = capsys.readouterr().err
    assert "contradict the declared --mean/--std" in err and "channel 0" in err
    assert _refine(guard_files, "dim.npz", tmp_path / "c") == 0
    assert "scaled twice" in capsys.readouterr().err


def test_refine_signs_as_it_writes(guard_files, tmp_path, capsys):
    from hansgate.errors import BundleError
    from hansgate.signing import generate_key_pair

    generate_key_pair(tmp_path / "k.key", tmp_path / "k.pub")
    out = tmp_path / "signed"
    assert _refine(guard_files, "right.npz", out, "--sign-key", str(tmp_path / "k.key")) == 0
    assert (out / "signature.json").is_file()
    capsys.readouterr()
    assert main(["verify", str(out), "--public-key", str(tmp_path / "k.pub")]) == 0
    assert "signature of key" in capsys.readouterr().out
    assert load_bundle(out, public_key=tmp_path / "k.pub").signed_by
    manifest = out / "manifest.json"
    text = manifest.read_bytes()
    manifest.write_bytes(text.replace(b'"rgem"', b'"rgeM"', 1))  # one byte
    assert main(["verify", str(out), "--public-key", str(tmp_path / "k.pub")]) == 2
    assert "hansgate: error:" in capsys.readouterr().err
    with pytest.raises(BundleError):
        load_bundle(out, public_key=tmp_path / "k.pub")
    assert _refine(guard_files, "right.npz", tmp_path / "never", "--sign-key", str(tmp_path / "missing.key")) == 2
    assert not (tmp_path / "never").exists()
