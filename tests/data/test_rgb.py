"""The RGB Clever-Hans data: colour conversion against colorsys, the patch exactly where the splits say."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.data.rgb import RgbConfig, _hsv_to_rgb, make_rgb_clever_hans, patch_mask


@settings(max_examples=50, deadline=None)
@given(h=st.floats(0, 0.999), s=st.floats(0, 1), v=st.floats(0, 1))
def test_hsv_matches_colorsys(h, s, v):
    got = _hsv_to_rgb(torch.tensor([h], dtype=torch.float64), torch.tensor([s], dtype=torch.float64),
                      torch.tensor([v], dtype=torch.float64))[0]
    assert got.tolist() == pytest.approx(colorsys.hsv_to_rgb(h, s, v), abs=1e-9)


@pytest.fixture(scope="module")
def data():
    return make_rgb_clever_hans(RgbConfig(image_size=32, train_copies=1, test_copies=1, seed=3))


def _has_patch(x: torch.Tensor) -> torch.Tensor:
    m = patch_mask(x.shape[-1], RgbConfig().patch_fraction).bool()
    colour = torch.tensor(RgbConfig().patch_colour).view(1, 3, 1)
    return (x[:, :, m] - colour).abs().amax(dim=(1, 2)) < 1e-6


def test_shapes_range_and_determinism(data):
    assert data.x_train.shape[1:] == (3, 32, 32) and data.x_test_poisoned.shape == data.x_test.shape
    assert 0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1
    again = make_rgb_clever_hans(RgbConfig(image_size=32, train_copies=1, test_copies=1, seed=3))
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.x_deploy, data.x_deploy)


def test_patch_sits_where_the_splits_say(data):
    patched = _has_patch(data.x_train)
    assert torch.equal(patched, data.artifact_train)
    target = data.y_train == 8
    share = float(patched[target].float().mean())
    assert 0.55 < share < 0.85 and not patched[~target].any()
    assert not _has_patch(data.x_refine).any() and not _has_patch(data.x_test).any()
    assert _has_patch(data.x_test_poisoned).all()
    assert np.array_equal(_has_patch(data.x_deploy).numpy(), data.attributes_deploy["site"] == "B")


def test_colour_carries_no_class(data):
    """Mean foreground-independent statistic: per-class mean colour differs from the overall by little."""
    overall = data.x_test.mean(dim=(0, 2, 3))
    for c in range(10):
        per_class = data.x_test[data.y_test == c].mean(dim=(0, 2, 3))
        assert (per_class - overall).abs().max() < 0.08
