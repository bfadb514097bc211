"""Passes over images that may stay on disk: the pipeline's helpers for ``data.streaming.LazyImages``.

``Images`` is a tensor or ``LazyImages``; ``select`` keeps a subset lazy (an index set into the
same files), ``stream_logits`` runs a model over every image in batches read ahead by the
DataLoader's workers, with a progress bar in images per second.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from hansgate.data.streaming import LazyImages
from hansgate.errors import DataError, ModelRunError
from hansgate.nn.hooks import eval_mode
from hansgate.nn.training import forward_batch_size, predict_logits

__all__ = ["Images", "Log", "STREAM_BATCH", "stream_batch", "select", "stream_logits", "stream_accuracy", "in_memory"]

#: images as tensors or read from disk in batches
Images = Union[torch.Tensor, LazyImages]
Log = Callable[[str], None]
#: images per batch when streaming a pass over the data (fewer for large images: ``stream_batch``)
STREAM_BATCH = 64


def stream_batch(x: Images) -> int:
    """``STREAM_BATCH``, bounded by ``nn.training.forward_batch_size`` (activation memory at large image sizes)."""
    return forward_batch_size(int(torch.Size(x.shape[1:]).numel()), cap=STREAM_BATCH)


def select(x: Images, idx: torch.Tensor) -> Images:
    """``x[idx]``: an index set into the same files when ``x`` is lazy, else a tensor."""
    return x.subset(idx) if isinstance(x, LazyImages) else x[idx]


def stream_logits(model: nn.Module, x: Images, *, progress: bool = False, desc: str = "predict") -> torch.Tensor:
    """Logits ``[N, K]`` of ``model`` (eval mode, restored after); lazy images stream in batches."""
    if not isinstance(x, LazyImages):
        return predict_logits(model, x)
    try:
        with eval_mode(model), torch.no_grad():
            out = [model(b) for b in x.iter_batches(stream_batch(x), progress=progress, desc=desc)]
    except RuntimeError as exc:
        raise ModelRunError(f"the model does not run on inputs of shape {tuple(x.shape[1:])}: "
                            f"{str(exc).splitlines()[0]}") from exc
    if not out:
        raise DataError("no samples to run the model on")
    return torch.cat(out)


def stream_accuracy(model: nn.Module, x: Images, y: torch.Tensor) -> float:
    """Share of correct argmax predictions, streamed."""
    return (stream_logits(model, x).argmax(1) == y).float().mean().item()


def in_memory(x: Images, log: Log, why: str) -> torch.Tensor:
    """``x`` as a tensor; lazy images are read whole, and ``log`` says so (with ``why``)."""
    return x.materialise(log, why) if isinstance(x, LazyImages) else x
