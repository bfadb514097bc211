"""Input normalisation baked into a model, so that bundles take the raw pixels their manifest declares.

One wrapper for every method's exported graph and for the audit's torch view of a bundle:
``Normalised(model, mean, std)(x) == model((x - mean) / std)`` per channel.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hansgate.errors import ConfigError

__all__ = ["Normalised"]


class Normalised(nn.Module):
    """``model((x - mean) / std)`` with per-channel ``mean``/``std`` buffers ``[1, C, 1, 1]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise ConfigError(f"normalisation needs one mean and one std per channel, got {len(mean)} and {len(std)}")
        if any(not float(s) > 0 for s in std):
            raise ConfigError(f"every std must be positive, got {list(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)
