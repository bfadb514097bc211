"""Decoy digits (refinement.decoy): patch placement and values, permuted splits, masks, teacher pools."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.data.decoy import DecoyConfig, contaminate, make_decoy, patch_values
from hansgate.errors import ConfigError


@pytest.fixture(scope="module")
def decoy():
    return make_decoy(DecoyConfig(train_copies=1, test_copies=1))


def test_patch_values_follow_the_paper():
    assert torch.allclose(patch_values(torch.arange(10)), (255 - 25 * torch.arange(10).float()) / 255)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 3), st.integers(0, 9), st.integers(1, 6), st.integers(8, 20))
def test_contaminate_places_one_patch_in_the_corner(corner, label, patch, size):
    x = torch.rand(1, 1, size, size) * 0.5
    out, mask = contaminate(x, torch.tensor([label]), torch.tensor([corner]), patch)
    assert mask.sum().item() == patch * patch
    rows = slice(0, patch) if corner < 2 else slice(size - patch, size)
    cols = slice(0, patch) if corner % 2 == 0 else slice(size - patch, size)
    assert (mask[0, 0, rows, cols] == 1).all()
    assert torch.allclose(out[0, 0, rows, cols], patch_values(torch.tensor([label])).expand(patch, patch))
    assert torch.equal(out[mask == 0], x[mask == 0])


def test_contaminate_refuses_mismatched_inputs():
    with pytest.raises(ConfigError):
        contaminate(torch.zeros(2, 1, 8, 8), torch.tensor([1]), torch.tensor([0, 1]))


def test_splits_masks_and_permutation(decoy):
    d = decoy
    for x, m in ((d.x_train, d.mask_train), (d.x_val, d.mask_val), (d.x_test, d.mask_test)):
        assert x.shape[1:] == (1, 28, 28) and m.shape == (len(x), 1, 28, 28)
        assert torch.all(m.flatten(1).sum(1) == 16)
        assert x.min() >= 0 and x.max() <= 1
    # contaminated = clean outside the patch; the patch encodes the label
    assert torch.equal(d.x_train[d.mask_train == 0], d.x_train_clean[d.mask_train == 0])
    values = (d.x_train * d.mask_train).flatten(1).sum(1) / 16
    assert torch.allclose(values, patch_values(d.y_train), atol=1e-6)
    # permuted test images differ from the contaminated ones only on the patch, with permuted values
    assert torch.equal(d.x_test_permuted[d.mask_test == 0], d.x_test[d.mask_test == 0])
    perm_values = (d.x_test_permuted * d.mask_test).flatten(1).sum(1) / 16
    assert sorted(perm_values.tolist()) == pytest.approx(sorted(patch_values(d.y_test).tolist()), abs=1e-6)
    assert (perm_values - patch_values(d.y_test)).abs().max() > 0.1
    # every split is stratified over all classes
    for y in (d.y_train, d.y_val, d.y_test, d.y_pool):
        assert set(y.tolist()) == set(range(10))


def test_teacher_subset_and_determinism(decoy):
    x, y = decoy.teacher_subset(0.1)
    assert len(y) == round(0.1 * len(decoy.y_train))
    assert x.shape == (len(y), 1, 28, 28)
    small = decoy.subset(50)
    assert len(small.y_train) == 50 and len(small.y_test) == len(decoy.y_test)
    with pytest.raises(ConfigError):
        decoy.teacher_subset(0.9)
    again = make_decoy(DecoyConfig(train_copies=1, test_copies=1))
    assert torch.equal(again.x_train, decoy.x_train) and torch.equal(again.x_test_permuted, decoy.x_test_permuted)
