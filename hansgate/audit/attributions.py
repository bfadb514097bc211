"""Input attributions through zennit, heatmap rendering, and the user-verification rule.

Methods, chosen by name (``ATTRIBUTION_METHODS``):

- ``lrp-epsilon-plus-flat`` — LRP with zennit's ``EpsilonPlusFlat`` composite (flat rule
  on the first layer, z+ on the other convolutions, epsilon on dense layers);
- ``lrp-epsilon-zplus-box`` — the "epsilon z+ b" composite of paper 001, Sec. 4.2
  (Kohlbrenner et al. 2020): z^B (``ZBox``) on the first convolution with the input's
  value range as bounds, z+ on the other convolutions, epsilon on dense layers;
- ``gradient``, ``smoothgrad`` (50 samples, sigma = 0.15 x input range), ``integrated-gradients``
  (baseline = per-feature minimum of the input range) and ``guided-backprop`` — the four
  methods of paper 003, Sec. 3 / App. B, through zennit's attributors.

Canonizers (chosen from the model, ``canonizers_for``): torchvision-layout ResNets get
zennit's ``ResNetCanonizer`` (merges batch-norm into the preceding convolution and makes
the skip connection's sum a module so LRP splits relevance between both branches);
torchvision VGGs ``VGGCanonizer``; every other model with batch-norm (MobileNet,
EfficientNet, VGG-like ``Sequential`` nets) ``SequentialMergeBatchNorm``. The model is put
in eval mode first (canonizers merge running statistics) and restored afterwards.

Where LRP has no sound rule (``lrp_note``): zennit passes relevance through
``nn.MultiheadAttention`` unchanged (it files attention under activations) and has no rule
for layer normalisation's division by a data-dependent scale (ViT, ConvNeXt). An LRP
method asked of such a model is replaced by ``AttributionConfig.lrp_fallback`` (default
``gradient``); ``explain`` returns the method used and the note saying why, for the
report. Skip sums outside ResNet blocks and squeeze-excitation gates (MobileNet,
EfficientNet) keep LRP, with a note that relevance there flows by the gradient.

``relevance_share_in_mask`` is paper 000, Supp. F.1's simulated user verification:
the share of absolute relevance (for the true class) inside a region mask; a sample is
verified when that share is at least ``accept_share`` (default 0.75).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonPlusFlat,
    GuidedBackprop,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite
from zennit.rules import Epsilon, ZBox, ZPlus
from torchvision.models.convnext import CNBlock
from torchvision.models.efficientnet import FusedMBConv, MBConv
from torchvision.models.mobilenetv2 import InvertedResidual as InvertedResidualV2
from torchvision.models.mobilenetv3 import InvertedResidual as InvertedResidualV3
from torchvision.models.vgg import VGG
from torchvision.ops.misc import SqueezeExcitation
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution

from hansgate.errors import ConfigError
from hansgate.nn.hooks import eval_mode
from hansgate.nn.training import forward_batch_size, gradient_batch_size

__all__ = [
    "ATTRIBUTION_METHODS",
    "AttributionConfig",
    "EpsilonZPlusBox",
    "canonizers_for",
    "lrp_note",
    "method_for",
    "Attribution",
    "explain",
    "attribute",
    "relevance_share_in_mask",
    "verify_by_relevance",
    "verified_indices",
    "heatmap_png",
    "heatmap_grid_png",
]


class AttributionConfig(BaseModel):
    """Defaults follow paper 003, App. B (SmoothGrad 50 samples at 0.15 x range) and zennit's epsilon."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(1e-6, gt=0)
    smoothgrad_samples: int = Field(50, ge=1)
    smoothgrad_noise: float = Field(0.15, ge=0)
    ig_steps: int = Field(32, ge=1)
    value_range: tuple[float, float] = (0.0, 1.0)
    #: images per differentiated pass; ``None``: ``nn.training.gradient_batch_size`` of the image size
    batch_size: int | None = Field(None, ge=1)
    seed: int = 0
    #: what an LRP method becomes on a model LRP has no sound rule for (``lrp_note``)
    lrp_fallback: str = "gradient"


class EpsilonZPlusBox(SpecialFirstLayerMapComposite):
    """The "epsilon z+ b" composite (paper 001, Sec. 4.2; Kohlbrenner et al. 2020).

    ``ZBox(low, high)`` on the first convolution, ``ZPlus`` on the other convolutions,
    ``Epsilon`` on dense layers; ``low``/``high`` are tensors broadcastable to the input.
    """

    def __init__(self, low: torch.Tensor, high: torch.Tensor, epsilon: float = 1e-6, stabilizer: float = 1e-6,
                 canonizers: list[Canonizer] | None = None) -> None:
        layer_map = layer_map_base(stabilizer) + [
            (Convolution, ZPlus(stabilizer=stabilizer)),
            (nn.Linear, Epsilon(epsilon=epsilon)),
        ]
        first_map = [(Convolution, ZBox(low=low, high=high, stabilizer=stabilizer))]
        super().__init__(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


def canonizers_for(model: nn.Module) -> list[Canonizer]:
    """The canonizers a model needs: ResNet skips + batch-norm, VGG, or batch-norm after convolutions."""
    mods = list(model.modules())
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in mods):
        return [ResNetCanonizer()]
    if any(isinstance(m, VGG) for m in mods):
        return [VGGCanonizer()]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods):
        return [SequentialMergeBatchNorm()]
    return []


_UNSOUND: tuple[tuple[type, str], ...] = (
    (nn.MultiheadAttention, "attention (zennit passes relevance through nn.MultiheadAttention unchanged)"),
    (nn.LayerNorm, "layer normalisation (no LRP rule for its division by a data-dependent scale)"),
)
_APPROXIMATE: tuple[tuple[type | tuple[type, ...], str], ...] = (
    ((InvertedResidualV2, InvertedResidualV3, MBConv, FusedMBConv, CNBlock), "skip sums outside ResNet blocks"),
    (SqueezeExcitation, "squeeze-excitation gates"),
)


def lrp_note(model: nn.Module) -> tuple[bool, str | None]:
    """``(sound, note)``: whether zennit's LRP rules cover ``model``, and what the report must say.

    ``sound=False`` for attention and layer normalisation (module doc): LRP is then replaced.
    ``sound=True`` with a note for approximations LRP keeps (relevance through skip sums
    outside ResNet blocks and multiplicative gates flows by the gradient); ``(True, None)``
    when every op has a rule.
    """
    mods = list(model.modules())
    unsound = [why for kind, why in _UNSOUND if any(isinstance(m, kind) for m in mods)]
    if unsound:
        return False, "LRP has no sound rule for " + " and ".join(unsound)
    approx = [why for kind, why in _APPROXIMATE if any(isinstance(m, kind) for m in mods)]
    if approx:
        return True, "LRP is approximate here: relevance through " + " and ".join(approx) + " follows the gradient"
    return True, None


def method_for(model: nn.Module, method: str, config: AttributionConfig | None = None) -> tuple[str, str | None]:
    """``(method used, note)`` when ``method`` is asked of ``model``: an LRP method on a model LRP
    has no sound rule for becomes ``config.lrp_fallback``, and the note says so."""
    if method not in ATTRIBUTION_METHODS:
        raise ConfigError(f"unknown attribution method {method!r}; choose from {list(ATTRIBUTION_METHODS)}")
    if not method.startswith("lrp"):
        return method, None
    cfg = config or AttributionConfig()
    sound, note = lrp_note(model)
    if sound:
        return method, note
    if cfg.lrp_fallback not in ATTRIBUTION_METHODS or cfg.lrp_fallback.startswith("lrp"):
        raise ConfigError(f"lrp_fallback must be a gradient method, got {cfg.lrp_fallback!r}")
    return cfg.lrp_fallback, f"{note}; {method} replaced by {cfg.lrp_fallback}"


@dataclass(frozen=True)
class Attribution:
    """An attribution and how it was made: ``relevance`` ``[N, C, H, W]``, the method asked for,
    the method used, and the note the report must carry (``None`` when there is nothing to say)."""

    relevance: torch.Tensor
    requested: str
    method: str
    note: str | None


def _composite(method: str, model: nn.Module, x: torch.Tensor, cfg: AttributionConfig) -> Composite | None:
    canon = canonizers_for(model)
    if method == "lrp-epsilon-plus-flat":
        return EpsilonPlusFlat(epsilon=cfg.epsilon, canonizers=canon)
    if method == "lrp-epsilon-zplus-box":
        low = torch.full_like(x[:1], cfg.value_range[0])
        high = torch.full_like(x[:1], cfg.value_range[1])
        return EpsilonZPlusBox(low=low, high=high, epsilon=cfg.epsilon, canonizers=canon)
    if method == "guided-backprop":
        return GuidedBackprop(canonizers=canon)
    return None


def _attributor(method: str, model: nn.Module, composite: Composite | None, cfg: AttributionConfig) -> Gradient:
    if method == "smoothgrad":
        return SmoothGrad(model, composite, noise_level=cfg.smoothgrad_noise, n_iter=cfg.smoothgrad_samples)
    if method == "integrated-gradients":
        low = cfg.value_range[0]
        return IntegratedGradients(model, composite, n_iter=cfg.ig_steps,
                                   baseline_fn=lambda t: torch.full_like(t, low))
    return Gradient(model, composite)


#: Registry of attribution methods by name.
ATTRIBUTION_METHODS: tuple[str, ...] = ("lrp-epsilon-plus-flat", "lrp-epsilon-zplus-box", "gradient", "smoothgrad",
                                        "integrated-gradients", "guided-backprop")


def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
            method: str = "lrp-epsilon-plus-flat", config: AttributionConfig | None = None,
            output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Attribution:
    """``attribute`` with the method actually used and the report's note (``method_for``)."""
    used, note = method_for(model, method, config)
    return Attribution(attribute(model, x, target, method, config, output_fn), method, used, note)


def attribute(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
              method: str = "lrp-epsilon-plus-flat", config: AttributionConfig | None = None,
              output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Attribution ``[N, C, H, W]`` of ``model`` for ``x`` ``[N, C, H, W]``.

    The explained quantity is the logit of ``target`` ``[N]`` (class indices): LRP starts from
    its value (one-hot times logit, so the map sums to about the logit), the gradient methods
    from the one-hot (so ``gradient`` is the plain input gradient of the logit). With
    ``output_fn(logits)`` that function's value is the start instead (e.g. a CAV projection).
    An LRP method on a model LRP has no sound rule for runs ``config.lrp_fallback`` instead
    (``method_for``; ``explain`` also returns the note). Every hook, canonizer and mode
    change is undone on return.
    """
    cfg = config or AttributionConfig()
    method, _ = method_for(model, method, cfg)
    if target is None and output_fn is None:
        raise ConfigError("attribute() needs a target class per sample or an output function")
    out = []
    # SmoothGrad's noise is seeded; fork_rng restores the caller's RNG state afterwards
    with torch.random.fork_rng(), eval_mode(model):
        torch.manual_seed(cfg.seed)
        step = cfg.batch_size or gradient_batch_size(int(x[0].numel()) if len(x) else 1)
        for start in range(0, len(x), step):
            xb = x[start : start + step].detach().clone()
            composite = _composite(method, model, xb, cfg)
            if output_fn is not None:
                fn = output_fn
            else:
                tb = target[start : start + step]  # type: ignore[index]

                def fn(logits: torch.Tensor, tb: torch.Tensor = tb) -> torch.Tensor:
                    onehot = torch.nn.functional.one_hot(tb, logits.shape[1]).to(logits)
                    # LRP starts from the logit's value (the map sums to it); gradient methods from 1
                    return onehot * logits if method.startswith("lrp") else onehot
            with _attributor(method, model, composite, cfg) as attributor:
                _, rel = attributor(xb.requires_grad_(True), fn)
            out.append(rel.detach())
    return torch.cat(out)


def relevance_share_in_mask(relevance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of absolute relevance inside ``mask`` per sample (paper 000, Supp. F.1).

    ``relevance`` ``[N, C, H, W]`` (summed over channels first), ``mask`` ``[H, W]`` or ``[N, H, W]``
    with values in {0, 1}; returns ``[N]`` in [0, 1] (0 for an all-zero heatmap).
    """
    r = relevance.abs().sum(1)
    m = mask.to(r).expand_as(r)
    total = r.flatten(1).sum(1)
    inside = (r * m).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def verify_by_relevance(relevance: torch.Tensor, mask: torch.Tensor, accept_share: float = 0.75) -> torch.Tensor:
    """``[N]`` bool: the samples a simulated user verifies (>= ``accept_share`` of relevance in ``mask``)."""
    if not 0.0 < accept_share <= 1.0:
        raise ConfigError(f"accept_share must lie in (0, 1], got {accept_share}")
    return relevance_share_in_mask(relevance, mask) >= accept_share


def verified_indices(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                     accept_share: float = 0.75, method: str = "lrp-epsilon-zplus-box",
                     config: AttributionConfig | None = None) -> torch.Tensor:
    """Indices of the samples a simulated user verifies (paper 000, Supp. F.1): predicted correctly
    and at least ``accept_share`` of the true class's absolute relevance inside ``mask`` ``[H, W]``.
    The result selects the verified refinement set, e.g. ``x[idx], y[idx]``."""
    with torch.no_grad(), eval_mode(model):
        step = forward_batch_size(int(x[0].numel()) if len(x) else 1)
        correct = torch.cat([model(x[i : i + step]).argmax(1) for i in range(0, len(x), step)]) == y
    rel = attribute(model, x, y, method, config)
    return (correct & verify_by_relevance(rel, mask, accept_share)).nonzero().flatten()


def _fig_png(fig: object) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_png(relevance: np.ndarray) -> str:
    """One heatmap ``[H, W]`` as a base64 PNG, symmetric colour scale (red +, blue -)."""
    return heatmap_grid_png([[relevance]], None, None)


def heatmap_grid_png(rows: list[list[np.ndarray]], row_titles: list[str] | None,
                     col_titles: list[str] | None, images: list[np.ndarray] | None = None) -> str:
    """A grid of heatmaps (rows x cols, each ``[H, W]``) as a base64 PNG; ``images`` adds the inputs as column 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(rows)
    n_cols = max(len(r) for r in rows) + (1 if images is not None else 0)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.4 * n_cols, 1.4 * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        cells = ([("image", images[i])] if images is not None else []) + [("heat", h) for h in row]
        for j, (kind, arr) in enumerate(cells):
            ax = axes[i][j]
            if kind == "image":
                ax.imshow(arr, cmap="gray", vmin=0, vmax=1)
            else:
                lim = float(np.abs(arr).max()) or 1.0
                ax.imshow(arr, cmap="bwr", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and col_titles is not None and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=7)
    return _fig_png(fig)
