"""The three RGB reproductions of issue 11, through ``hansgate refine`` on a small RGB ImageFolder.

A random-init ``small_resnet`` (torchvision BasicBlocks, batch norm; 3 channels, 2 classes) with
ImageNet normalisation; its last layer is scaled so that its decisions have margins a short
fine-tuning does not flip, and its bias shifted so that it splits the images evenly; every
image is filed under the class the model predicts, so all are verified. The concept is a red square in the top-left corner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hansgate.bundle import load_bundle
from hansgate.cli import main
from hansgate.data.datasets import load_labelled
from hansgate.nn.models import load_model, source_sha256, state_dict_sha256
from hansgate.nn.normalisation import Normalised
from hansgate.refinement.pipeline import DataOptions, load_inputs

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
SIZE = 32
MODEL = "small_resnet"


def _images(n: int, side: int, seed: int) -> np.ndarray:
    """``n`` smooth random RGB images ``[n, side, side, 3]`` uint8 (4x4 noise, upsampled)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                                .resize((side, side), Image.Resampling.BILINEAR)) for _ in range(n)])


def _patch(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    k = max(3, images.shape[1] // 5)
    out[:, :k, :k] = (255, 0, 0)
    return out


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (im, c) in enumerate(zip(images, labels)):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    torch.manual_seed(0)
    model = load_model(MODEL, num_classes=2, in_channels=3, image_size=SIZE)
    clean = _images(48, SIZE, seed=0)
    normalised = Normalised(model, MEAN, STD).eval()
    with torch.no_grad():
        model.fc.weight *= 30
        logits = normalised(_as_tensor(clean))
        model.fc.bias[1] -= float((logits[:, 1] - logits[:, 0]).median()) + 1e-4  # an even split
        labels = normalised(_as_tensor(clean)).argmax(1).numpy()
    assert 0.3 < labels.mean() < 0.7
    save_file(model.state_dict(), str(root / "w.safetensors"))
    _write_folder(root / "data", clean, labels)
    # concept samples: 12 other images with and without the patch, at 48 px (the data's size is 32)
    other = _images(12, 48, seed=1)
    _write_folder(root / "with", _patch(other), np.zeros(12, int))
    _write_folder(root / "without", other, np.ones(12, int))
    small = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
                      for im in np.concatenate([other, _patch(other)])])
    np.savez(root / "patch.npz", x=_as_tensor(small).numpy(), y=np.zeros(24, np.int64),
             concept=np.arange(24) >= 12)
    return root, model, _as_tensor(clean), labels


def _refine(root: Path, out: Path, method: str, concept: str, *extra: str) -> list[str]:
    return ["refine", "--model", MODEL, "--weights", str(root / "w.safetensors"),
            "--data", str(root / "data"), "--channels", "3", "--image-size", str(SIZE), str(SIZE),
            "--method", method, "--concept", f"patch={concept}", *extra, "--out", str(out), "--quiet"]


def _agreement_with_source(bundle_dir: Path, model: torch.nn.Module, x_raw: torch.Tensor) -> tuple[float, float]:
    """(bundle on raw pixels vs the source model on normalised pixels, the same vs the source on raw pixels)."""
    sess = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    served = sess.run(None, {"input": x_raw.numpy()})[0].argmax(1)
    with torch.no_grad():
        source = Normalised(model, MEAN, STD).eval()(x_raw).argmax(1).numpy()
        unnormalised = model(x_raw).argmax(1).numpy()
    return float((served == source).mean()), float((served == unnormalised).mean())


def test_rr_clarc_with_mean_std_from_imagefolder_serves_raw_pixels(rgb, tmp_path):
    """Reproduction 1: the issue's command with --mean/--std and an .npz concept works end to end."""
    root, model, x, labels = rgb
    out = tmp_path / "rr"
    args = _refine(root, out, "rr-clarc", str(root / "patch.npz"), "--mean", *map(str, MEAN), "--std",
                   *map(str, STD), "--epochs", "1", "--lambdas", "1")
    assert main(args) == 0
    manifest = load_bundle(out).manifest
    assert manifest.method.name == "rr-clarc" and manifest.method.layers == ["layer2.1"]
    spec = manifest.input
    assert (spec.channels, spec.height, spec.width, spec.color_mode) == (3, SIZE, SIZE, "RGB")
    assert spec.mean == pytest.approx(MEAN) and spec.std == pytest.approx(STD)
    assert spec.normalization_in_graph and tuple(spec.value_range) == (0.0, 1.0)
    assert manifest.evaluation.before["verified_acc"] == 1.0  # every image is filed under its prediction
    agree, agree_unnormalised = _agreement_with_source(out, model, x)
    assert agree >= 0.95
    assert agree_unnormalised < 0.9  # the check can tell: without the baked normalisation they would differ
    # reproduction 3 (the hash): the one function, equal for the model the audit loads
    loaded = load_model(MODEL, root / "w.safetensors", num_classes=2, in_channels=3, image_size=SIZE)
    assert manifest.source_model.sha256 == source_sha256(MODEL, root / "w.safetensors", loaded)
    assert manifest.source_model.sha256 == state_dict_sha256(model)


def test_concepts_from_imagefolders_follow_channels_and_image_size(rgb):
    """Reproduction 2: concept folders at 48 px are read like the data: 3 channels at --image-size, normalised."""
    root, model, x, labels = rgb
    options = DataOptions(channels=3, image_size=(SIZE, SIZE), mean=tuple(MEAN), std=tuple(STD))
    inputs = load_inputs(str(root / "data"), options,
                         concepts={"patch": f"{root / 'with'},{root / 'without'}", "npz": str(root / "patch.npz")})
    folders = inputs.concepts["patch"]
    assert folders.x.shape == (24, 3, SIZE, SIZE) and inputs.x.shape == (48, 3, SIZE, SIZE)
    assert folders.concept.tolist() == [True] * 12 + [False] * 12
    assert folders.y.tolist() == [0] * 12 + [1] * 12  # class directories c0 / c1 by name
    # the same images as the .npz (resized by PIL alike), so both forms give the same concept
    npz = inputs.concepts["npz"]
    assert torch.allclose(folders.x[:12], npz.x[12:], atol=1 / 255)
    assert inputs.y.bincount().tolist() == np.bincount(labels).tolist()
    assert inputs.input_spec().normalization_in_graph
    assert torch.allclose(inputs.to_model(x), (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))


def test_pre_normalised_data_is_refused_instead_of_a_bundle_that_lies(rgb, tmp_path, capsys):
    """Reproduction 3: data outside [0, 1] cannot be described by the manifest; one clear error, no bundle."""
    root, model, x, labels = rgb
    pre = tmp_path / "pre.npz"
    np.savez(pre, x=Normalised(torch.nn.Identity(), MEAN, STD)(x).numpy(), y=labels)
    out = tmp_path / "never"
    args = ["refine", "--model", MODEL, "--weights", str(root / "w.safetensors"), "--data", str(pre),
            "--method", "p-clarc", "--concept", f"patch={root / 'patch.npz'}", "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside [0, 1]" in err[0] and "--mean/--std" in err[0]
    assert not out.exists()


def test_concept_folder_classes_must_be_the_datas(rgb, tmp_path, capsys):
    root, *_ = rgb
    odd = _write_folder(tmp_path / "odd", _images(4, 16, seed=3), np.array([0, 0, 1, 1]) + 5)
    args = _refine(root, tmp_path / "never", "p-clarc", f"{odd},{root / 'without'}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not among the data's classes" in err and len(err.strip().splitlines()) == 1
    assert load_labelled(root / "with", channels=3, size=(SIZE, SIZE), min_classes=1).x.shape[1:] == (3, SIZE, SIZE)
