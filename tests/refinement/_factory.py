"""A user-style model factory for ``package.module:factory`` loading tests."""

from torch import nn


def tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def not_a_model() -> str:
    return "surprise"
