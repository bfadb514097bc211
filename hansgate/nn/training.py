"""Plain supervised training and batched evaluation, shared by the demo and the baselines."""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from hansgate.errors import ModelRunError

__all__ = ["TrainConfig", "train_classifier", "predict_logits", "accuracy", "batches", "frozen_batchnorm",
           "FORWARD_VALUES", "GRADIENT_VALUES", "forward_batch_size", "gradient_batch_size"]

#: input values per batch of a forward pass without gradients (8 MiB of float32 input): a conv stem that
#: widens 3 channels to 64 at full resolution (VGG) holds about 21 times the input per activation
FORWARD_VALUES = 1 << 21
#: input values per batch of a pass that keeps the graph for a backward pass (attributions, TCAV
#: gradients): every activation stays alive until the backward pass, so a quarter of ``FORWARD_VALUES``
GRADIENT_VALUES = FORWARD_VALUES >> 2


class TrainConfig(BaseModel):
    """Paper 000, Supp. E (MNIST): Adam, 5 epochs, learning rate 1e-3, batch 128."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig | None = None,
                     progress: bool = False, desc: str = "train") -> nn.Module:
    """Train ``model`` in place with cross-entropy; returns it in eval mode."""
    cfg = config or TrainConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for _ in tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False):
        for idx in batches(len(y), cfg.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def forward_batch_size(sample_numel: int, cap: int = 512) -> int:
    """Images per forward pass without gradients: ``FORWARD_VALUES`` input values, at most ``cap``, at least 1.

    Why: activation memory grows with batch times image size; bounding the input bounds it
    (13 images at 3 x 224 x 224), while small images keep ``cap`` (512 digits of 28 x 28).
    """
    return max(1, min(cap, FORWARD_VALUES // max(1, int(sample_numel))))


def gradient_batch_size(sample_numel: int, cap: int = 64) -> int:
    """Images per pass that is differentiated (``GRADIENT_VALUES`` input values, at most ``cap``, at least 1).

    Why: a backward pass holds every activation of the batch at once (3 images at 3 x 224 x 224,
    ``cap`` for digits), the bound that keeps the audit's attributions of a ResNet-50 small.
    """
    return max(1, min(cap, GRADIENT_VALUES // max(1, int(sample_numel))))


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Logits ``[N, K]`` in eval mode, batched; a model that fails raises ``ModelRunError``.

    The default batch is ``forward_batch_size`` (512 digits, 13 images at 224 px), so
    activation memory stays bounded at large image sizes.
    """
    if batch_size is None:
        batch_size = forward_batch_size(int(x[0].numel()) if len(x) else 1)
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    except RuntimeError as exc:
        raise ModelRunError(f"the model does not run on inputs of shape {tuple(x.shape[1:])}: "
                            f"{str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
    if not out:
        raise ModelRunError("no samples to run the model on")
    logits = torch.cat(out)
    if logits.ndim != 2:
        raise ModelRunError(f"the model returns shape {tuple(logits.shape)}, expected [N, classes]")
    return logits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    """Share of correct argmax predictions (batches as ``predict_logits``)."""
    return (predict_logits(model, x, batch_size).argmax(1) == y).float().mean().item()


class frozen_batchnorm:
    """Context manager: train mode everywhere except batch-norm layers, restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in self._modes:
            m.train(mode)
