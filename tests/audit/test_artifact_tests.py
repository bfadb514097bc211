"""Known-artifact tests on a hand-built shortcut model: the learned artifact is flagged, the control is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hansgate.audit.artifact_tests import (
    ArtifactTestConfig,
    PatchArtifact,
    artifact_prediction_test,
    carries,
    known_artifact_tests,
    parse_patch_spec,
    resolve_artifacts,
)
from hansgate.data.artifacts import get_artifact
from hansgate.errors import ConfigError, DataError


class ShortcutNet(nn.Module):
    """Class 1 iff the corner artifact's pixels are bright, else class 0 (by mean ink): a pure shortcut."""

    def __init__(self) -> None:
        super().__init__()
        mask = get_artifact("corner").mask(12, 12)
        self.conv = nn.Conv2d(1, 2, 12, bias=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0] = 10.0 * mask
            self.conv.bias[:] = torch.tensor([5.0, 0.0])
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.relu(self.conv(x))))


def _data(n: int = 80):
    torch.manual_seed(0)
    x = torch.rand(n, 1, 12, 12) * 0.1  # corner logit at most 3 < 5 on clean images
    y = torch.zeros(n, dtype=torch.long)
    return x, y


def _predict(model):
    return lambda a: model(torch.from_numpy(a)).detach().numpy()


def test_learned_artifact_flagged_control_not():
    model = ShortcutNet().eval()
    x, y = _data()
    arts = resolve_artifacts(["corner", "dot"])
    res = known_artifact_tests({"m": _predict(model)}, {"m": model}, x, y, ["0", "1"], arts,
                               ArtifactTestConfig(relevance_samples=8))
    corner, dot = res.artifacts["corner"].models["m"], res.artifacts["dot"].models["m"]
    assert corner.flagged and corner.flip_rate == 1.0 and corner.accuracy_drop == 1.0
    assert corner.top_target == "1" and corner.top_target_share == 1.0
    assert not dot.flagged and dot.flip_rate == 0.0
    # all relevance of the shortcut class sits on the three corner pixels
    assert corner.relevance_share > 0.99 > 0.1 > res.artifacts["corner"].mask_area_share
    assert corner.relevance_share_n == 8
    assert abs(corner.relevance_share_ratio - corner.relevance_share / res.artifacts["corner"].mask_area_share) < 1e-4
    assert set(res.heatmaps) == {"corner", "dot"} and set(res.heatmaps["corner"].rows) == {"m"}
    d = res.as_dict()
    assert set(d) == {"config", "artifacts"} and "tcav" not in d["artifacts"]["corner"]
    assert d["artifacts"]["corner"]["models"]["m"]["relevance_share"] == corner.relevance_share


def test_prediction_test_closed_form():
    cfg = ArtifactTestConfig()
    y = np.array([0, 0, 1, 1])
    clean = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=float)  # acc 0.75
    pasted = np.array([[0, 1], [1, 0], [0, 1], [0, 1]], dtype=float)  # acc 0.75, flips 2
    seq = iter([clean, pasted])
    res = artifact_prediction_test(lambda a: next(seq), np.zeros((4, 1, 2, 2)), y, np.zeros((4, 1, 2, 2)), ["a", "b"], cfg)
    assert res.flip_rate == 0.5 and res.accuracy_drop == 0.0 and res.top_target == "b"
    assert res.top_target_share == 1.0 and res.n == 4
    assert res.flagged  # flip rate above 0.10
    # without a torch model there is no relevance share, and the report row has no such keys
    assert "relevance_share" not in res.as_dict() and res.as_dict()["flip_rate"] == 0.5


def test_samples_already_carrying_the_artifact_are_skipped():
    x, y = _data(10)
    art = get_artifact("corner")
    x[:4] = art.apply(x[:4])
    assert carries(x, art).tolist() == [True] * 4 + [False] * 6
    model = ShortcutNet().eval()
    res = known_artifact_tests({"m": _predict(model)}, {}, x, y, ["0", "1"], [art], ArtifactTestConfig())
    assert res.artifacts["corner"].n_clean == 6 and res.artifacts["corner"].models["m"].n == 6
    with pytest.raises(DataError, match="already carries"):
        known_artifact_tests({"m": _predict(model)}, {}, art.apply(x), y, ["0", "1"], [art], ArtifactTestConfig())


def test_patch_artifact_from_npy_and_png(tmp_path):
    from PIL import Image

    np.save(tmp_path / "p.npy", np.ones((2, 3), dtype=np.float32))
    Image.fromarray(np.full((2, 2), 255, dtype=np.uint8)).save(tmp_path / "p.png")
    a = parse_patch_spec(f"tag={tmp_path / 'p.npy'}@1,2")
    b = parse_patch_spec(f"sq={tmp_path / 'p.png'}@0,0")
    x = torch.zeros(2, 1, 6, 6)
    out = a.apply(x)
    assert out[:, :, 1:3, 2:5].eq(1).all() and out.sum() == 2 * 6
    assert a.mask(6, 6).sum() == 6 and b.mask(6, 6)[:2, :2].eq(1).all()
    assert carries(out, a).all() and not carries(x, a).any()


@pytest.mark.parametrize("spec, err, match", [
    ("nofile", ConfigError, "NAME=PATH@ROW,COL"),
    ("x=missing.npy@0,0", DataError, "not found"),
    ("x=p.npy@a,b", ConfigError, "NAME=PATH@ROW,COL"),
])
def test_bad_patch_specs(tmp_path, monkeypatch, spec, err, match):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "p.npy", np.ones((2, 2), dtype=np.float32))
    with pytest.raises(err, match=match):
        parse_patch_spec(spec)


def test_patch_outside_image_and_duplicate_names():
    p = PatchArtifact("big", np.ones((1, 4, 4), dtype=np.float32), 10, 10)
    with pytest.raises(ConfigError, match="does not fit"):
        p.apply(torch.zeros(1, 1, 12, 12))
    with pytest.raises(ConfigError, match="unique"):
        resolve_artifacts(["dot", "dot"])
    with pytest.raises(ConfigError, match="unknown artifact"):
        resolve_artifacts(["sticker"])
