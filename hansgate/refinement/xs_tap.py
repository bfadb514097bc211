"""Targeted activation penalty, TAP (paper 002, Eq. 6-8), split from ``refinement.xs`` which re-exports it.

The channel sum ``A^l`` of each targeted layer's output, multiplied by the annotation
mask downscaled to that layer (Eq. 7, cumulatively layer to layer) and penalised by its
squared Frobenius norm (the authors' code; the paper writes the L1 norm, which
``norm="l1"`` gives), averaged over layers and batch. One forward pass, no second
derivatives; the activations are read through ``nn.hooks.capture`` inside the
``TargetedActivations`` context manager.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hansgate.errors import ConfigError, DataError
from hansgate.nn.hooks import capture

__all__ = ["TapGeometry", "as_mask", "downscale_masks", "activation_map", "tap_penalty", "tap_layers", "TargetedActivations",
           "tap_loss"]

TapGeometry = Literal["reference", "adaptive"]


def as_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Validate a mask against a batch ``x`` ``[N, C, H, W]``; return it as float ``[N, 1, H, W]``."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
        raise DataError(
            f"mask of shape {tuple(mask.shape)} does not fit inputs of shape {tuple(x.shape)}; "
            "expected [N, 1, H, W] or [N, H, W]"
        )
    return mask.to(dtype=x.dtype, device=x.device)


def downscale_masks(mask: torch.Tensor, sizes: list[tuple[int, int]], kernel: int = 3,
                    geometry: TapGeometry = "reference") -> list[torch.Tensor]:
    """Paper 002 Eq. 7, applied cumulatively layer to layer: ``M^l = AvgPool(MaxPool_k,1(M^{l-1}), H^l, W^l)``.

    ``mask`` ``[N, 1, H, W]``; ``sizes`` the targeted layers' ``(H^l, W^l)`` in forward order.
    The max-pool (kernel ``k``, stride 1, padding ``k // 2``) widens the marked region by
    ``k // 2`` pixels; average pooling then shrinks the map.

    ``geometry="reference"`` (the authors' code): a layer of the current size keeps the mask
    as it is; a smaller one gets the max-pool, then average pooling with kernel = stride =
    the integer ratio ``floor(H^{l-1} / H^l)``, then, where the ratio is not an integer,
    nearest resizing to ``(H^l, W^l)``; a larger one gets nearest interpolation.
    ``"adaptive"``: the max-pool at every layer, then adaptive average pooling (overlapping
    windows where the ratio is not an integer), nearest interpolation for larger maps.
    Both agree where each size divides the previous one and differs from it.
    Returns one ``[N, 1, H^l, W^l]`` mask per layer.
    """
    if geometry not in ("reference", "adaptive"):
        raise ConfigError(f"unknown TAP mask geometry {geometry!r}; choose reference or adaptive")
    out, cur = [], mask
    for h, w in sizes:
        ch, cw = cur.shape[-2:]
        if geometry == "adaptive":
            cur = F.max_pool2d(cur, kernel, stride=1, padding=kernel // 2)
            if (h, w) != (ch, cw):
                cur = F.adaptive_avg_pool2d(cur, (h, w)) if h <= ch and w <= cw else \
                    F.interpolate(cur, size=(h, w), mode="nearest")
        elif (h, w) != (ch, cw):
            if h <= ch and w <= cw:
                cur = F.max_pool2d(cur, kernel, stride=1, padding=kernel // 2)
                ratio = (ch // h, cw // w)
                cur = F.avg_pool2d(cur, ratio, stride=ratio)
            if tuple(cur.shape[-2:]) != (h, w):
                cur = F.interpolate(cur, size=(h, w), mode="nearest")
        out.append(cur)
    return out


def activation_map(z: torch.Tensor) -> torch.Tensor:
    """Paper 002 Eq. 6: signed channel sum ``A^l = sum_c a_c`` of an activation ``[N, C, H, W]`` -> ``[N, 1, H, W]``."""
    return z.sum(dim=1, keepdim=True)


def tap_penalty(activations: list[torch.Tensor], mask: torch.Tensor, kernel: int = 3,
                norm: Literal["l2sq", "l1"] = "l2sq", geometry: TapGeometry = "reference") -> torch.Tensor:
    """Paper 002 Eq. 8: ``mean_n (1/L) sum_l ||D(M, l) (.) A^l||`` over the targeted activations (forward order)."""
    if not activations:
        raise ConfigError("TAP needs at least one targeted layer")
    for a in activations:
        if a.dim() != 4:
            raise ConfigError(f"TAP layers must output [N, C, H, W] maps, got shape {tuple(a.shape)}")
    maps = [activation_map(a) for a in activations]
    masks = downscale_masks(mask, [tuple(a.shape[-2:]) for a in maps], kernel, geometry)  # type: ignore[misc]
    terms = []
    for a, m in zip(maps, masks):
        prod = m * a
        terms.append(prod.pow(2).sum(dim=(1, 2, 3)) if norm == "l2sq" else prod.abs().sum(dim=(1, 2, 3)))
    return torch.stack(terms).mean(0).mean()


def tap_layers(model: nn.Module) -> list[str]:
    """The layers TAP targets, spaced through the network (paper 002, "Models").

    ResNets: the output of every residual stage (``layer1``, ``layer2``, ...);
    DenseNets: every dense block; otherwise the output of every 2-D max-pool (each
    VGG block; both conv blocks of the two-layer MNIST CNN). Anything else needs
    explicit layer names.
    """
    names = dict(model.named_modules())
    stages = sorted((n for n in names if re.fullmatch(r"layer\d+", n)), key=lambda n: int(n[5:]))
    if stages:
        return stages
    dense = [n for n in names if re.fullmatch(r"(features\.)?denseblock\d+", n)]
    if dense:
        return dense
    pools = [n for n, m in names.items() if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))]
    if pools:
        return pools
    raise ConfigError(f"cannot choose TAP layers for {type(model).__name__} automatically; pass layer names")


class TargetedActivations:
    """Context manager: records the outputs of ``layers`` on every forward pass (``nn.hooks.capture``).

    ``outputs`` holds the activations since the last ``clear`` in the order of ``layers``
    (give them in forward order: TAP downscales its mask cumulatively); the hooks are
    removed on exit.
    """

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ConfigError(f"model has no layer(s) {missing}")
        self.model, self.layers = model, list(layers)
        self._ctx: Any = None
        self._store: dict[str, list[torch.Tensor]] = {}

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [t for name in self.layers for t in self._store.get(name, [])]

    def clear(self) -> None:
        for v in self._store.values():
            v.clear()

    def __enter__(self) -> "TargetedActivations":
        self._ctx = capture(self.model, self.layers, copy=False)
        self._store = self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        ctx, self._ctx, self._store = self._ctx, None, {}
        if ctx is not None:
            ctx.__exit__(None, None, None)


def tap_loss(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, layers: list[str] | None = None,
             kernel: int = 3, norm: Literal["l2sq", "l1"] = "l2sq",
             geometry: TapGeometry = "reference") -> torch.Tensor:
    """Targeted activation penalty (paper 002 Eq. 8) of ``model`` on ``x``; layers default to ``tap_layers``."""
    m = as_mask(mask, x)
    with TargetedActivations(model, layers or tap_layers(model)) as rec:
        model(x)
        return tap_penalty(rec.outputs, m, kernel, norm, geometry)
