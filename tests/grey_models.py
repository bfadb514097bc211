"""A random ``mnist_cnn`` and raw grey images labelled by its own normalised predictions (shared by
the CLI's guard tests and the pipeline tests): every sample is verified, and the model decides
between several classes rather than answering one."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def self_labelled_grey(root: Path, n: int, mean: float, std: float, classes: int = 3,
                       seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, x [n, 1, 28, 28] in [0, 1], y)``; the model's weights are saved as ``root/w.safetensors``."""
    from safetensors.torch import save_file

    from hansgate.nn.models import load_model
    from hansgate.nn.normalisation import Normalised

    torch.manual_seed(seed)
    model = load_model("mnist_cnn", num_classes=classes)
    with torch.no_grad():
        model.fc2.weight *= 20  # sharper logits: a random init otherwise ties on grey noise
    x = torch.rand(n, 1, 28, 28)
    with torch.no_grad():
        y = Normalised(model, [mean], [std])(x).argmax(1)
    save_file(model.state_dict(), str(root / "w.safetensors"))
    return model, x, y
