"""The RGB Clever-Hans dataset: colourised digits with a coloured-patch shortcut (no download).

The embedded grey digits (``digits.make_clever_hans`` with no artifact) are colourised per
image — the strokes in a random saturated hue, the background a random dark, desaturated
colour, plus mild pixel noise — so that colour carries no class information. The shortcut
is a solid ``patch_colour`` square of side ``patch_fraction * size`` pasted in the top-left
corner, on a share ``rate`` of the target class's training images, exactly as the grey
dataset's artifact (paper 000, Sec. 4.1): the verified refinement pool is patch-free, the
test set comes clean and 100 % patched, and the deploy split carries the patch on its
site-B share (the ``site`` attribute), so the shortcut suppresses site B's recall.

This is the larger, three-channel stand-in for the third-party models users bring
(torchvision ResNets, MobileNets at 32-64 px here; 224 px costs too much on CPU to train).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from hansgate.data.digits import CleverHansConfig, CleverHansData, make_clever_hans, stroke_attribute

__all__ = ["RgbConfig", "patch_mask", "paste_patch", "make_rgb_clever_hans"]


class RgbConfig(BaseModel):
    """How to build the RGB dataset; the split sizes follow the grey dataset's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(32, ge=16, le=64)
    target_class: int = Field(8, ge=0, le=9)
    rate: float = Field(0.7, ge=0.0, le=1.0, description="share of target-class training images with the patch")
    seed: int = 0
    patch_fraction: float = Field(0.15, gt=0.0, le=0.5, description="patch side over image side")
    patch_colour: tuple[float, float, float] = (1.0, 0.0, 1.0)
    noise: float = Field(0.03, ge=0.0, le=0.2, description="std of the Gaussian pixel noise")
    site_b_share: float = Field(0.3, ge=0.0, le=1.0)
    train_copies: int = Field(4, ge=1, le=20)
    test_copies: int = Field(2, ge=1, le=20)


def patch_mask(size: int, fraction: float) -> torch.Tensor:
    """``[size, size]`` mask of the top-left patch (side ``max(2, round(fraction * size))``, one pixel in)."""
    side = max(2, round(fraction * size))
    mask = torch.zeros(size, size)
    mask[1 : 1 + side, 1 : 1 + side] = 1.0
    return mask


def paste_patch(x: torch.Tensor, which: torch.Tensor, cfg: RgbConfig) -> torch.Tensor:
    """Copy of ``x [N, 3, S, S]`` with the patch on the images where ``which [N]`` is true."""
    out = x.clone()
    if which.any():
        m = patch_mask(x.shape[-1], cfg.patch_fraction).to(x)
        colour = torch.tensor(cfg.patch_colour).view(1, 3, 1, 1).to(x)
        out[which] = x[which] * (1 - m) + colour * m
    return out


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[N]`` hue, saturation, value in [0, 1] -> ``[N, 3]`` RGB (the standard sextant formula)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _colourise(grey: torch.Tensor, cfg: RgbConfig, gen: torch.Generator) -> torch.Tensor:
    n = len(grey)
    fg = _hsv_to_rgb(torch.rand(n, generator=gen), 0.6 + 0.4 * torch.rand(n, generator=gen),
                     0.75 + 0.25 * torch.rand(n, generator=gen))
    bg = _hsv_to_rgb(torch.rand(n, generator=gen), 0.3 * torch.rand(n, generator=gen),
                     0.1 + 0.3 * torch.rand(n, generator=gen))
    x = grey * fg[:, :, None, None] + (1 - grey) * bg[:, :, None, None]
    x = x + cfg.noise * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def make_rgb_clever_hans(config: RgbConfig | None = None) -> CleverHansData:
    """Build the RGB dataset (``x`` ``[N, 3, S, S]`` in [0, 1]), deterministic under ``config.seed``.

    Returns the grey dataset's container; ``artifact`` is the grey generator's (unused) placeholder,
    the shortcut here is the patch (``paste_patch``).
    """
    cfg = config or RgbConfig()
    grey = make_clever_hans(CleverHansConfig(rate=0.0, site_b_share=0.0, seed=cfg.seed, image_size=cfg.image_size,
                                             target_class=cfg.target_class, train_copies=cfg.train_copies,
                                             test_copies=cfg.test_copies))
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    x_train = _colourise(grey.x_train, cfg, gen)
    patched = (grey.y_train == cfg.target_class) & (torch.rand(len(grey.y_train), generator=gen) < cfg.rate)
    x_train = paste_patch(x_train, patched, cfg)
    x_test = _colourise(grey.x_test, cfg, gen)
    from_b = torch.rand(len(grey.y_test), generator=gen) < cfg.site_b_share
    clean = ~patched
    stroke = stroke_attribute(grey.x_test, grey.y_test)
    return CleverHansData(
        config=grey.config,
        artifact=grey.artifact,
        classes=list(grey.classes),
        x_train=x_train,
        y_train=grey.y_train,
        artifact_train=patched,
        x_refine=x_train[clean],
        y_refine=grey.y_train[clean],
        x_test=x_test,
        y_test=grey.y_test,
        x_test_poisoned=paste_patch(x_test, torch.ones(len(x_test), dtype=torch.bool), cfg),
        x_deploy=paste_patch(x_test, from_b, cfg),
        y_deploy=grey.y_test.clone(),
        attributes_test={"stroke": stroke, "site": np.full(len(grey.y_test), "A")},
        attributes_deploy={"stroke": stroke, "site": np.where(from_b.numpy(), "B", "A")},
    )
