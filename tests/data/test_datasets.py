"""Reading a user's data: .npz and ImageFolder, each problem one ``DataError``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hansgate.data.datasets import load_labelled, save_npz
from hansgate.errors import DataError


def test_npz_round_trip_with_classes_and_extras(tmp_path):
    x, y = torch.rand(6, 2, 3, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    save_npz(tmp_path / "d.npz", x, y, ["a", "b", "c"], attr=np.arange(6))
    ds = load_labelled(tmp_path / "d.npz")
    assert torch.equal(ds.x, x) and torch.equal(ds.y, y) and ds.classes == ["a", "b", "c"]
    np.savez(tmp_path / "plain.npz", x=x.numpy(), y=y.numpy())
    assert load_labelled(tmp_path / "plain.npz").classes == ["0", "1", "2"]


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 1, 2, 2), np.float32)}, "must hold arrays 'x' and 'y'"),
    ({"x": np.zeros((2, 2, 2), np.float32), "y": np.zeros(2, np.int64)}, r"\[N, C, H, W\]"),
    ({"x": np.zeros((2, 1, 2, 2), np.uint8), "y": np.zeros(2, np.int64)}, "float32"),
    ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": np.zeros(3, np.int64)}, "'y' must be N=2"),
    ({"x": np.full((2, 1, 2, 2), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "NaN"),
    ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": np.array([0, 5]), "classes": np.array(["a", "b"])}, "labels"),
])
def test_bad_npz_is_one_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_labelled(tmp_path / "bad.npz")


def _folder(root, classes, side=10, mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new(mode, (side + 2 * i, side), color=(200, 10, 50) if mode == "RGB" else 128).save(
                root / c / f"{i}.png")
    (root / classes[0] / "notes.txt").write_text("ignored")
    return root


def test_imagefolder_reads_channels_and_size(tmp_path):
    root = _folder(tmp_path / "f", ["cat", "dog"])
    rgb = load_labelled(root, channels=3, size=(6, 8))
    assert rgb.x.shape == (4, 3, 6, 8) and rgb.y.tolist() == [0, 0, 1, 1] and rgb.classes == ["cat", "dog"]
    assert torch.allclose(rgb.x[:, 0], torch.full((4, 6, 8), 200 / 255), atol=1e-6)
    grey = load_labelled(root, channels=1, size=(5, 5))
    assert grey.x.shape == (4, 1, 5, 5) and float(grey.x.max()) <= 1.0


def test_imagefolder_problems_are_one_clear_error(tmp_path):
    one = _folder(tmp_path / "one", ["only"])
    with pytest.raises(DataError, match="at least 2"):
        load_labelled(one)
    assert load_labelled(one, min_classes=1).classes == ["only"]
    with pytest.raises(DataError, match="grey .* or RGB"):
        load_labelled(_folder(tmp_path / "two", ["a", "b"]), channels=2)
    broken = _folder(tmp_path / "broken", ["a", "b"])
    (broken / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_labelled(broken)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_labelled(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_labelled(tmp_path / "missing")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match=".npz file or an ImageFolder"):
        load_labelled(tmp_path / "d.csv")
