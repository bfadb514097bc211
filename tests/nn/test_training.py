"""Batched evaluation: the forward batch bound by input size, and that batching does not change predictions."""

from __future__ import annotations

import torch
from torch import nn

from hansgate.nn import training
from hansgate.nn.training import (
    FORWARD_VALUES,
    GRADIENT_VALUES,
    accuracy,
    forward_batch_size,
    gradient_batch_size,
    predict_logits,
)


def test_forward_batch_is_bounded_by_input_values():
    assert forward_batch_size(28 * 28) == 512  # digits keep the cap
    assert forward_batch_size(28 * 28, cap=256) == 256
    assert forward_batch_size(3 * 224 * 224) == FORWARD_VALUES // (3 * 224 * 224) == 13
    assert forward_batch_size(3 * 64 * 64, cap=64) == 64
    assert forward_batch_size(4 * FORWARD_VALUES) == 1  # never below one image
    for numel in (1, 784, 3 * 224 * 224, 3 * 512 * 512):
        assert forward_batch_size(numel) * numel <= max(FORWARD_VALUES, numel)


def test_gradient_batch_is_a_quarter_of_the_forward_bound():
    assert GRADIENT_VALUES * 4 == FORWARD_VALUES
    assert gradient_batch_size(28 * 28) == 64  # digits keep the cap
    assert gradient_batch_size(3 * 224 * 224) == 3
    assert gradient_batch_size(3 * 224 * 224, cap=2) == 2
    assert gradient_batch_size(3 * 1024 * 1024) == 1  # never below one image
    for numel in (1, 784, 3 * 64 * 64, 3 * 224 * 224):
        assert gradient_batch_size(numel) * numel <= max(GRADIENT_VALUES, numel)


def test_predictions_do_not_depend_on_the_batch(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x, y = torch.rand(40, 3, 8, 8), torch.randint(0, 5, (40,))
    whole = predict_logits(model, x)
    acc = accuracy(model, x, y)
    monkeypatch.setattr(training, "FORWARD_VALUES", 3 * 8 * 8 * 7)  # 7 images per batch
    assert forward_batch_size(3 * 8 * 8) == 7
    torch.testing.assert_close(predict_logits(model, x), whole, rtol=0, atol=1e-6)
    assert accuracy(model, x, y) == acc
