"""Scoped model hooks: capture what a layer sees or emits, read gradients at a layer, borrow eval mode.

Every hook lives only inside its ``with`` block and is removed on exit, also on error
(STYLE.md habit 4). These are the one place hansgate registers forward hooks; the
refiners, the CAV code and the audit read activations through them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from hansgate.errors import ConfigError

__all__ = ["module_named", "capture", "leaf_outputs", "eval_mode"]


def module_named(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule ``name``; ``ConfigError`` with the name when it has none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"model has no module named {name!r}") from None


@contextmanager
def capture(model: nn.Module, layers: list[str], *, what: Literal["output", "input"] = "output",
            copy: bool = True) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, ``store[name]`` receives one tensor per call of each named module.

    ``what="input"`` records the module's first positional input instead of its output.
    ``copy`` stores detached clones: an in-place ReLU after a conv would otherwise
    overwrite the stored activation. ``copy=False`` keeps the live tensor (graph attached),
    for callers that differentiate through it.
    """
    store: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []
    for name in layers:
        module = module_named(model, name)

        def keep(value: torch.Tensor, name: str = name) -> None:
            store[name].append(value.detach().clone() if copy else value)

        if what == "input":
            handles.append(module.register_forward_pre_hook(lambda m, inp, keep=keep: keep(inp[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, inp, out, keep=keep: keep(out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def leaf_outputs(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward replaces ``layer``'s output by a fresh leaf that requires grad.

    The list receives the leaf per call, so ``torch.autograd.grad(f, leaf)`` is the gradient
    of anything downstream w.r.t. the layer's activation, with no parameter gradients. The
    model continues on ``leaf * 1.0`` (a non-leaf), so in-place ops after the layer stay legal.
    """
    store: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: object, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        store.append(leaf)
        return leaf * 1.0

    handle = module_named(model, layer).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode within the block; the caller's train/eval flags of every submodule come back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
