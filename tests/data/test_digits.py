"""The embedded Clever-Hans digits: determinism, splits, artifacts and subgroup attributes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from hansgate.data.artifacts import ARTIFACTS, get_artifact
from hansgate.data.digits import CleverHansConfig, make_clever_hans, stroke_attribute
from hansgate.errors import ConfigError


def test_deterministic_under_seed_and_different_across_seeds():
    a = make_clever_hans(CleverHansConfig(seed=3, artifact="frame"))
    b = make_clever_hans(CleverHansConfig(seed=3, artifact="frame"))
    c = make_clever_hans(CleverHansConfig(seed=4, artifact="frame"))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.artifact_train, b.artifact_train)
    assert not torch.equal(a.x_train, c.x_train)


def test_splits_and_artifact_placement(digits_data):
    d = digits_data
    assert d.x_train.shape[1:] == (1, 28, 28) and d.x_train.dtype == torch.float32
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1
    # artifact only on the target class, at about the configured rate
    assert torch.all(d.y_train[d.artifact_train] == 8)
    share = d.artifact_train[d.y_train == 8].float().mean().item()
    assert abs(share - 0.7) < 0.08
    mask = d.artifact.mask(28, 28).bool()
    on = lambda x: (x[:, 0][:, mask] == 1.0).all(1)  # noqa: E731 - every artifact pixel at full intensity
    assert on(d.x_train[d.artifact_train]).all()
    assert not on(d.x_refine).any(), "the verified pool must be artifact-free"
    assert on(d.x_test_poisoned).all() and not on(d.x_test).any()
    assert torch.equal(d.x_test_poisoned[:, 0][:, ~mask], d.x_test[:, 0][:, ~mask])


def test_site_attribute_marks_artifact_carriers(digits_data):
    d = digits_data
    site = d.attributes_deploy["site"]
    mask = d.artifact.mask(28, 28).bool()
    carries = (d.x_deploy[:, 0][:, mask] == 1.0).all(1).numpy()
    assert np.array_equal(site == "B", carries)
    assert 0.2 < (site == "B").mean() < 0.4
    assert set(d.attributes_test["site"]) == {"A"}


def test_stroke_attribute_splits_each_class_at_its_median():
    x = torch.zeros(6, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    assert list(stroke_attribute(x, y)) == ["thin", "thin", "thick", "thin", "thin", "thick"]


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_artifacts_keep_range_and_masks_match(name):
    art = get_artifact(name)
    x = torch.rand(3, 1, 28, 28)
    out = art.apply(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    changed = (out != x).any(0)[0]
    assert not changed[art.mask(28, 28) == 0].any()


def test_lsb_artifact_hides_the_message_in_three_low_bits():
    """Paper 001's LSB attack: at most 7/255 per pixel, the payload reads back, applying twice changes nothing."""
    art = get_artifact("lsb")
    x = torch.rand(2, 1, 28, 28)
    out = art.apply(x)
    assert not art.localized and (out - x).abs().max() <= 7.5 / 255
    q = (out * 255).round().to(torch.int64)
    bits = "".join(format(int(v) & 7, "03b") for v in q[0, 0].flatten()[:8])  # 24 bits = the first 3 bytes
    assert bytes(int(bits[i : i + 8], 2) for i in range(0, 24, 8)) == b"han"
    assert torch.equal(art.apply(out), out)


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError):
        make_clever_hans(CleverHansConfig(artifact="nope"))
    with pytest.raises(ValidationError):
        CleverHansConfig(rate=1.5)


def test_calibration_split_is_disjoint_and_leaves_the_default_unchanged():
    plain = make_clever_hans(CleverHansConfig(seed=4, train_copies=1, test_copies=1))
    assert len(plain.x_calib) == 0
    again = make_clever_hans(CleverHansConfig(seed=4, train_copies=1, test_copies=1, calibration_share=0.0))
    assert torch.equal(plain.x_test, again.x_test) and torch.equal(plain.x_deploy, again.x_deploy)
    split = make_clever_hans(CleverHansConfig(seed=4, train_copies=1, test_copies=1, calibration_share=0.25))
    assert torch.equal(split.x_train, plain.x_train)
    assert len(split.x_calib) + len(split.x_test) == len(plain.x_test)
    assert len(split.x_calib) == len(split.y_calib) and 0.2 < len(split.x_calib) / len(plain.x_test) < 0.3
    test_rows = {tuple(r.tolist()) for r in split.x_test.flatten(1)}
    assert not any(tuple(r.tolist()) in test_rows for r in split.x_calib.flatten(1))
