"""Explanatory supervision (XS) while training: RRR, RBR and TAP (papers 002, 004).

Every term takes the model, a batch ``x`` ``[N, C, H, W]`` and an annotation mask
``[N, 1, H, W]`` or ``[N, H, W]`` that is 1 on the pixels the model must not use
(paper 002, Eq. 2), and returns a scalar added to the task loss:
``CE + lambda * L_XS`` (paper 002, Eq. 3).

- **RRR** (paper 002 Eq. 4, Ross et al. 2017): squared masked input gradient of the
  label-agnostic ``sum_k log softmax_k``, summed over channels, each sample divided by
  its mask area (Ross et al.). Second order.
- **RBR** (paper 004 Eq. 1): ``sum (M * IF * IG)^2`` with the influence term
  ``IF = grad_x sum_theta dL/dtheta`` (the identity in place of the inverse Hessian,
  as the paper does; ``L`` the batch-mean cross-entropy) and ``IG`` the RRR input
  gradient, summed over batch, channels and pixels (the reference code's scale). Third order.
- **TAP** (paper 002 Eq. 6-8, ``refinement.xs_tap``): the channel sum of each targeted
  layer's output times the mask downscaled to that layer, squared Frobenius norm.

Input gradients (RRR, RBR) are taken in eval mode, as in the reference code: each
image's gradient then depends on that image only. Where the papers are silent the
defaults follow the reference code (``seeds/IMPLEMENTATION-NOTES.md``); the project's
earlier choices remain as named options of ``XSConfig`` (``grad_mode="train"``,
``rrr_norm="none"``, ``rbr_scale="per_sample"``, ``tap_geometry="adaptive"``). A change
of scale moves the useful lambda range: grids tuned on one do not transfer.

``xs_objective`` computes task loss and XS term of one batch; ``train_xs`` is the
training loop the CLI and the benchmark use.
"""

from __future__ import annotations

import time
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.errors import ConfigError, DataError, ModelRunError
from hansgate.nn.hooks import eval_mode
from hansgate.nn.surgery import explicit_batchnorm
from hansgate.nn.training import batches
from hansgate.refinement.xs_tap import (
    TapGeometry,
    as_mask,
    TargetedActivations,
    activation_map,
    downscale_masks,
    tap_layers,
    tap_loss,
    tap_penalty,
)

__all__ = [
    "XS_METHODS",
    "XSConfig",
    "TargetedActivations",
    "explicit_batchnorm",
    "as_mask",
    "input_gradient",
    "rrr_penalty",
    "rrr_loss",
    "influence_map",
    "rbr_penalty",
    "rbr_loss",
    "downscale_masks",
    "activation_map",
    "tap_penalty",
    "tap_layers",
    "tap_loss",
    "xs_objective",
    "train_xs",
]

#: Names ``--xs`` accepts; ``none`` is plain cross-entropy (the "No XS" model).
XS_METHODS: tuple[str, ...] = ("none", "rrr", "rbr", "tap")
RRRNorm = Literal["area", "none"]
RBRScale = Literal["reference", "per_sample"]


# --------------------------------------------------------------------------- RRR


def _mode_dependent(model: nn.Module) -> bool:
    """Whether ``model`` computes differently in train and eval mode (normalisation statistics, dropout)."""
    return any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd))
               for m in model.modules())


def input_gradient(logits: torch.Tensor, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``d/dx sum_n sum_k log softmax_k(logits_n)``, shape of ``x``; ``x`` must require grad.

    Each image's logits depend only on that image when the model runs in eval mode (the
    reference's choice, ``XSConfig.grad_mode``), so the summed objective yields every
    image's own input gradient in one backward pass.
    """
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, dim=1).sum(), x, create_graph=create_graph)
    return grad


def rrr_penalty(input_grad: torch.Tensor, mask: torch.Tensor, norm: RRRNorm = "area") -> torch.Tensor:
    """Paper 002 Eq. 4: ``mean_n sum_ij [M (.) sum_c G_c]_ij^2 / |M_n|`` for gradients ``G`` ``[N, C, H, W]``.

    ``norm="area"`` divides each sample's term by its mask area ``|M_n| = sum_ij M_nij`` (Ross
    et al.'s normalisation; an empty mask contributes 0); ``"none"`` leaves the plain sum.
    """
    per_sample = (mask * input_grad.sum(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2, 3))
    if norm == "area":
        per_sample = per_sample / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    elif norm != "none":
        raise ConfigError(f"unknown RRR normalisation {norm!r}; choose area or none")
    return per_sample.mean()


def rrr_loss(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, norm: RRRNorm = "area") -> torch.Tensor:
    """Label-agnostic "right for the right reasons" penalty (paper 002 Eq. 4, Ross et al. 2017).

    ``mean_n sum_ij [M (.) sum_c d(sum_k log softmax_k f(x_n))/dx_c]_ij^2 / |M_n|``: the input
    gradient of the summed log-probabilities, summed over channels, masked, squared and
    summed over pixels, divided by the mask area, averaged over the batch. The model runs
    in eval mode (its mode is restored); built with ``create_graph=True`` so that it can
    be minimised (a second-order term).
    """
    m = as_mask(mask, x)
    x = x.detach().requires_grad_(True)
    with eval_mode(model):
        return rrr_penalty(input_gradient(model(x), x), m, norm)


# --------------------------------------------------------------------------- RBR


def influence_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None,
                  create_graph: bool = True, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Paper 004, "explanations via influence functions" with ``H^-1 := I``: ``grad_x sum_theta dL/dtheta``.

    ``L`` is the batch's cross-entropy, averaged (``reduction="mean"``, the reference) or
    summed; with ``sum`` row ``n`` is ``grad_{x_n} sum_theta dL(x_n, y_n)/dtheta`` (images do
    not interact in eval mode), with ``mean`` the same divided by ``N``. ``x`` must require
    grad; ``logits`` may be passed to reuse a forward pass. Shape of ``x``.
    """
    if logits is None:
        logits = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction=reduction), params, create_graph=True)
    total = torch.stack([g.sum() for g in grads]).sum()
    (infl,) = torch.autograd.grad(total, x, create_graph=create_graph)
    return infl


def rbr_penalty(influence: torch.Tensor, input_grad: torch.Tensor, mask: torch.Tensor,
                scale: RBRScale = "reference") -> torch.Tensor:
    """Paper 004 Eq. 1 (right reasons): the masked product ``M IF IG`` squared and summed.

    ``scale="reference"``: ``sum_{n,c,ij} (M_nij IF_ncij IG_ncij)^2`` (every channel squared on
    its own, summed over the batch; pair with ``influence_map(reduction="mean")``).
    ``"per_sample"``: ``mean_n sum_ij (M_nij sum_c IF_ncij IG_ncij)^2`` (channels summed after
    the product, averaged over the batch; pair with ``reduction="sum"``).
    """
    if scale == "reference":
        return (mask * influence * input_grad).pow(2).sum()
    if scale == "per_sample":
        masked = mask * (influence * input_grad).sum(dim=1, keepdim=True)
        return masked.pow(2).sum(dim=(1, 2, 3)).mean()
    raise ConfigError(f"unknown RBR scale {scale!r}; choose reference or per_sample")


def _rbr_term(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, scale: RBRScale,
              logits: torch.Tensor | None = None) -> torch.Tensor:
    """RBR of a batch whose ``x`` requires grad, inside ``explicit_batchnorm`` (third derivatives)."""
    with explicit_batchnorm(model):
        logits = model(x) if logits is None else logits
        infl = influence_map(model, x, y, logits, reduction="mean" if scale == "reference" else "sum")
        return rbr_penalty(infl, input_gradient(logits, x), mask, scale)


def rbr_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
             scale: RBRScale = "reference") -> torch.Tensor:
    """"Right for better reasons" penalty (paper 004 Eq. 1, identity Hessian); differentiable in the parameters.

    The model runs in eval mode (its mode is restored); batch-norm layers are computed by
    ``nn.surgery.explicit_batchnorm`` while the term is built, since the fused kernel has no
    third derivative.
    """
    m = as_mask(mask, x)
    x = x.detach().requires_grad_(True)
    with eval_mode(model):
        return _rbr_term(model, x, y, m, scale)


# --------------------------------------------------------------------------- training


class XSConfig(BaseModel):
    """Training with explanatory supervision: ``CE + lam * L_XS`` (paper 002 Eq. 3).

    Adam at learning rate 1e-3, as the other trainers here (the paper: SGD, 50 epochs);
    ``layers`` are TAP's targeted layers (default ``tap_layers``). Defaults follow the
    reference code where the papers are silent, the alternatives are named:
    ``grad_mode``: RRR's and RBR's input gradients from an eval-mode forward pass
    (``eval``; the cross-entropy still trains in train mode) or from the training forward
    pass itself (``train``, one pass fewer; batch statistics then couple the images).
    ``rrr_norm``, ``rbr_scale``, ``tap_geometry``: see ``rrr_penalty``, ``rbr_penalty``,
    ``downscale_masks``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["none", "rrr", "rbr", "tap"] = "tap"
    lam: float = Field(1.0, ge=0)
    epochs: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    layers: list[str] | None = None
    tap_kernel: int = Field(3, ge=1)
    tap_norm: Literal["l2sq", "l1"] = "l2sq"
    tap_geometry: TapGeometry = "reference"
    grad_mode: Literal["eval", "train"] = "eval"
    rrr_norm: RRRNorm = "area"
    rbr_scale: RBRScale = "reference"


def xs_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, config: XSConfig,
                 recorder: TargetedActivations | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss ``CE + lam * L_XS`` of one batch, and its parts as floats.

    TAP reads its activations from ``recorder`` (entered on ``model`` by the caller). RRR and
    RBR with ``grad_mode="eval"`` run a second, eval-mode forward pass for the penalty when
    the model computes differently in the two modes (otherwise the pass is shared).
    """
    m = as_mask(mask, x)
    method, lam = config.method, config.lam
    if recorder is not None:
        recorder.clear()
    penalised = method in ("rrr", "rbr") and lam != 0
    separate = penalised and config.grad_mode == "eval" and _mode_dependent(model)
    xg = x.detach().requires_grad_(True) if penalised else x
    if method == "rbr" and penalised and not separate:
        with explicit_batchnorm(model):  # the fused batch-norm has no third derivative
            logits = model(xg)
        ce = F.cross_entropy(logits, y)
        xs = _rbr_term(model, xg, y, m, config.rbr_scale, logits)
        return ce + lam * xs, {"ce": float(ce.detach()), "xs": float(xs.detach())}
    if separate:  # the eval-mode penalty first: it sees the model as the step starts, as rrr_loss/rbr_loss do
        with eval_mode(model):
            xs = rrr_penalty(input_gradient(model(xg), xg), m, config.rrr_norm) if method == "rrr" else \
                _rbr_term(model, xg, y, m, config.rbr_scale)
        ce = F.cross_entropy(model(x), y)
        return ce + lam * xs, {"ce": float(ce.detach()), "xs": float(xs.detach())}
    logits = model(xg)
    ce = F.cross_entropy(logits, y)
    if method == "rrr" and penalised:
        xs = rrr_penalty(input_gradient(logits, xg), m, config.rrr_norm)
    elif method == "tap" and lam != 0:
        if recorder is None:
            raise ConfigError("TAP needs a TargetedActivations recorder around the model")
        xs = tap_penalty(recorder.outputs, m, config.tap_kernel, config.tap_norm, config.tap_geometry)
    else:
        xs = torch.zeros((), dtype=ce.dtype)
    return ce + lam * xs, {"ce": float(ce.detach()), "xs": float(xs.detach())}


def train_xs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, config: XSConfig,
             callback: Callable[[int, dict[str, float]], None] | None = None) -> nn.Module:
    """Train ``model`` in place on ``x`` ``[N, C, H, W]``, ``y`` ``[N]`` and masks with ``config``; eval mode after.

    ``callback(epoch, {"ce", "xs", "seconds"})`` receives each epoch's mean losses.
    Raises ``DataError`` for mismatched inputs and ``ModelRunError`` if the loss diverges.
    """
    if len(x) != len(y) or len(y) == 0:
        raise DataError(f"need one label per image, got {len(x)} images and {len(y)} labels")
    masks = as_mask(masks, x)
    layers = (config.layers or tap_layers(model)) if config.method == "tap" else []
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    with TargetedActivations(model, layers) as rec:
        for epoch in range(config.epochs):
            t0, sums, n = time.perf_counter(), {"ce": 0.0, "xs": 0.0}, 0
            for idx in batches(len(y), config.batch_size, gen):
                opt.zero_grad(set_to_none=True)
                loss, parts = xs_objective(model, x[idx], y[idx], masks[idx], config, rec if layers else None)
                if not torch.isfinite(loss):
                    raise ModelRunError(f"{config.method} loss diverged (lam={config.lam:g}); lower the learning "
                                        "rate or lambda")
                loss.backward()
                opt.step()
                for k in sums:
                    sums[k] += parts[k] * len(idx)
                n += len(idx)
            if callback is not None:
                callback(epoch, {k: v / n for k, v in sums.items()} | {"seconds": time.perf_counter() - t0})
    return model.eval()
