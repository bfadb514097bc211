"""Teacher masks (refinement.teacher): saliency normalisation, thresholds, precision/recall, a teacher end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hansgate.errors import ConfigError, DataError
from hansgate.refinement.teacher import (
    Teacher,
    TeacherConfig,
    mask_precision_recall,
    normalized_saliency,
    threshold_masks,
)


def test_saliency_of_a_linear_model_is_its_normalised_weight_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    x = torch.rand(5, 2, 3, 3)
    y = torch.tensor([0, 1, 2, 3, 0])
    sal = normalized_saliency(model, x, y)
    for n in range(5):
        row = model[1].weight[y[n]].detach().view(2, 3, 3).abs().sum(0)
        assert torch.allclose(sal[n, 0], row / row.max(), atol=1e-6)
    assert sal.shape == (5, 1, 3, 3) and sal.min() >= 0
    assert torch.allclose(sal.flatten(1).max(1).values, torch.ones(5))
    # default: explain the predicted class
    pred = model(x).argmax(1)
    assert torch.allclose(normalized_saliency(model, x), normalized_saliency(model, x, pred))


def test_threshold_and_precision_recall_by_hand():
    sal = torch.tensor([[[[0.0, 0.5], [0.05, 1.0]]]])
    masks = threshold_masks(sal, 0.1)
    assert masks.tolist() == [[[[1.0, 0.0], [1.0, 0.0]]]]
    truth = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    pr = mask_precision_recall(masks, truth)
    assert pr == {"precision": 0.5, "recall": 0.5, "coverage": 0.5}
    with pytest.raises(ConfigError):
        threshold_masks(sal, 0.0)
    with pytest.raises(DataError):
        mask_precision_recall(masks, truth[..., :1])


def test_teacher_end_to_end_masks_cover_the_decoy_patch():
    from hansgate.data.decoy import DecoyConfig, make_decoy

    data = make_decoy(DecoyConfig(train_copies=1, test_copies=1))
    x, y = data.teacher_subset(0.1)
    with pytest.raises(ConfigError):
        Teacher().masks(x)
    teacher = Teacher(TeacherConfig(epochs=5)).fit(x, y, num_classes=10)
    assert teacher.n_train_ == len(y) and not teacher.model_.training
    masks = teacher.masks(data.x_train[:200], data.y_train[:200])
    assert masks.shape == (200, 1, 28, 28) and set(masks.unique().tolist()) <= {0.0, 1.0}
    pr = mask_precision_recall(masks, data.mask_train[:200])
    # a teacher that never saw patches finds them unimportant: most patch pixels are masked,
    # far more often than pixels in general
    assert pr["recall"] > 0.5 and pr["recall"] > 1.5 * pr["coverage"]
    with pytest.raises(DataError):
        Teacher().fit(x[:1], y[:1])
