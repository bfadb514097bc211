"""``hansgate train --xs`` end to end (refinement.xs_pipeline): bundles that verify, masks from files, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hansgate.bundle import load_bundle
from hansgate.cli import main
from hansgate.data.datasets import save_npz
from hansgate.data.decoy import DecoyConfig, make_decoy


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = make_decoy(DecoyConfig(train_copies=1, test_copies=1)).subset(96)
    root = tmp_path_factory.mktemp("xsdata")
    save_npz(root / "train.npz", d.x_train, d.y_train, d.classes)
    np.savez(root / "masks.npz", mask=d.mask_train.numpy())
    np.savez(root / "bad_masks.npz", mask=d.mask_train[:5].numpy())
    save_npz(root / "clean.npz", d.x_pool, d.y_pool, d.classes)
    return root


def test_train_tap_on_decoy_writes_a_verified_bundle(tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = main(["train", "--xs", "tap", "--model", "mnist_cnn", "--data", "decoy", "--n-train", "64", "--epochs", "1",
               "--lambdas", "1e-4", "1e-2", "--out", str(out), "--quiet"])
    assert rc == 0
    bundle = load_bundle(out)
    method = bundle.manifest.method
    assert method.name == "tap" and method.layers == ["pool1", "pool2"]
    hp = method.hyperparameters
    assert hp["masks"]["source"].startswith("ground truth") and hp["tap_kernel"] == 3
    sel = hp["selection"]
    assert sel["rule"].startswith("min cross-entropy") and len(sel["candidates"]) == 2
    losses = [c["val_loss"] for c in sel["candidates"]]
    assert sel["chosen"]["lam"] == sel["candidates"][int(np.argmin(losses))]["params"]["lam"] == hp["lam"]
    assert {"acc_contaminated", "acc_permuted", "delta"} <= set(bundle.manifest.evaluation.after)
    summary = json.loads(capsys.readouterr().out.split("bundle written")[0])
    assert summary["method"] == "tap"
    # the same directory again without --overwrite is refused, and nothing changes
    before = (out / "manifest.json").read_bytes()
    assert main(["train", "--xs", "tap", "--model", "mnist_cnn", "--data", "decoy", "--n-train", "32",
                 "--out", str(out), "--quiet"]) == 2
    assert (out / "manifest.json").read_bytes() == before


def test_train_rrr_with_mask_file(small_files, tmp_path):
    out = tmp_path / "rrr"
    rc = main(["train", "--xs", "rrr", "--model", "mnist_cnn", "--data", str(small_files / "train.npz"),
               "--masks", str(small_files / "masks.npz"), "--lam", "10", "--epochs", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    manifest = load_bundle(out).manifest
    assert manifest.method.name == "rrr" and manifest.method.hyperparameters["lam"] == 10
    assert manifest.method.hyperparameters["masks"]["source"] == "file"
    assert manifest.classes == [str(i) for i in range(10)]


@pytest.mark.parametrize("extra, message", [
    (["--masks", "bad_masks.npz"], "do not fit"),
    ([], "exactly one of --masks or --teacher-share"),
    (["--teacher-share", "0.1"], "--teacher-data"),
    (["--teacher-share", "0.1", "--teacher-data", "clean.npz", "--masks", "masks.npz"], "not both"),
    (["--masks", "masks.npz", "--lambdas", "1", "2"], "--val-data"),
    (["--masks", "masks.npz", "--lam", "-1"], "invalid option"),
])
def test_train_bad_input_is_one_clear_error(small_files, tmp_path, capsys, extra, message):
    extra = [str(small_files / e) if e.endswith(".npz") else e for e in extra]
    out = tmp_path / "never"
    rc = main(["train", "--xs", "tap", "--model", "mnist_cnn", "--data", str(small_files / "train.npz"), *extra,
               "--epochs", "1", "--out", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_teacher_masks_from_clean_data(small_files):
    from hansgate.refinement.xs import XSConfig
    from hansgate.refinement.xs_pipeline import TrainXSConfig, train_xs_from_files

    cfg = TrainXSConfig(xs=XSConfig(method="tap", lam=1e-3, epochs=1), teacher_share=0.5, teacher_epochs=2)
    torch.manual_seed(0)
    bundle, summary = train_xs_from_files(model_spec="mnist_cnn", weights=None, data=str(small_files / "train.npz"),
                                          out=small_files / "teacher_bundle", config=cfg,
                                          teacher_data=str(small_files / "clean.npz"))
    assert summary["masks"]["source"] == "teacher" and summary["masks"]["teacher_images"] == 48
    assert bundle.manifest.method.hyperparameters["masks"]["tau"] == 0.01
