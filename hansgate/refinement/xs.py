"""Explanatory supervision (XS) while training: RRR, RBR and TAP (papers 002, 004).

Every term takes the model, a batch ``x`` ``[N, C, H, W]`` and an annotation mask
``[N, 1, H, W]`` or ``[N, H, W]`` that is 1 on the pixels the model must not use
(paper 002, Eq. 2), and returns a scalar added to the task loss:
``CE + lambda * L_XS`` (paper 002, Eq. 3).

- **RRR** (paper 002 Eq. 4, Ross et al. 2017): squared masked input gradient of the
  label-agnostic ``sum_k log softmax_k``, summed over channels. Second order.
- **RBR** (paper 004 Eq. 1): ``sum (M * IF * IG)^2`` with the influence term
  ``IF = grad_x sum_theta dL/dtheta`` (the identity in place of the inverse Hessian,
  as the paper does) and ``IG`` the RRR input gradient. Third order.
- **TAP** (paper 002 Eq. 6-8): the channel sum ``A^l`` of each targeted layer's
  output, multiplied by the mask downscaled to that layer and penalised by its
  squared Frobenius norm (the authors' code; the paper writes the L1 norm, which
  ``norm="l1"`` gives), averaged over layers and batch. One forward pass, no
  second derivatives; the activations are read by forward hooks that live only
  inside the ``TargetedActivations`` context manager.

``xs_objective`` computes task loss and XS term from one shared forward pass;
``train_xs`` is the training loop the CLI and the benchmark use.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.errors import ConfigError, DataError
from hansgate.nn.training import batches

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


# --------------------------------------------------------------------------- RRR


def input_gradient(logits: torch.Tensor, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``d/dx sum_n sum_k log softmax_k(logits_n)``, shape of ``x``; ``x`` must require grad.

    Each image's logits depend only on that image (batch-norm in eval mode), so the
    summed objective yields every image's own input gradient in one backward pass.
    """
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, dim=1).sum(), x, create_graph=create_graph)
    return grad


def rrr_penalty(input_grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper 002 Eq. 4: ``mean_n sum_ij [M (.) sum_c G_c]_ij^2`` for gradients ``G`` ``[N, C, H, W]``."""
    masked = mask * input_grad.sum(dim=1, keepdim=True)
    return masked.pow(2).sum(dim=(1, 2, 3)).mean()


def rrr_loss(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Label-agnostic "right for the right reasons" penalty (paper 002 Eq. 4, Ross et al. 2017).

    ``mean_n sum_ij [M (.) sum_c d(sum_k log softmax_k f(x_n))/dx_c]_ij^2``: the input
    gradient of the summed log-probabilities, summed over channels, masked, squared
    and summed over pixels, averaged over the batch. Built with ``create_graph=True``
    so that it can be minimised (a second-order term).
    """
    m = as_mask(mask, x)
    x = x.detach().requires_grad_(True)
    return rrr_penalty(input_gradient(model(x), x), m)


# --------------------------------------------------------------------------- RBR


def influence_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None,
                  create_graph: bool = True) -> torch.Tensor:
    """Paper 004, "explanations via influence functions" with ``H^-1 := I``: ``grad_x sum_theta dL/dtheta``.

    ``L`` is the summed cross-entropy of the batch, so row ``n`` of the result is
    ``grad_{x_n} sum_theta dL(x_n, y_n)/dtheta`` (images do not interact in eval mode).
    ``x`` must require grad; ``logits`` may be passed to reuse a forward pass. Shape of ``x``.
    """
    if logits is None:
        logits = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), params, create_graph=True)
    total = torch.stack([g.sum() for g in grads]).sum()
    (infl,) = torch.autograd.grad(total, x, create_graph=create_graph)
    return infl


def rbr_penalty(influence: torch.Tensor, input_grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper 004 Eq. 1 (right reasons): ``mean_n sum_d (M_nd IF_nd IG_nd)^2``, channels summed after the product."""
    masked = mask * (influence * input_grad).sum(dim=1, keepdim=True)
    return masked.pow(2).sum(dim=(1, 2, 3)).mean()


def rbr_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """"Right for better reasons" penalty (paper 004 Eq. 1, identity Hessian); differentiable in the parameters.

    Batch-norm layers are computed by ``explicit_batchnorm`` while the term is built,
    since the fused kernel has no third derivative.
    """
    m = as_mask(mask, x)
    x = x.detach().requires_grad_(True)
    with explicit_batchnorm(model):
        logits = model(x)
        return rbr_penalty(influence_map(model, x, y, logits), input_gradient(logits, x), m)


class _ExplicitBatchNorm(nn.Module):
    """The batch-norm of a wrapped ``_BatchNorm`` written with elementary ops (differentiable to any order).

    PyTorch's fused batch-norm has no third derivative, which RBR needs; this computes
    the same normalisation and running-statistics update on the wrapped module's own
    parameters and buffers.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        running_mean, running_var = bn.running_mean, bn.running_var
        tracked = bn.num_batches_tracked
        if bn.training or running_mean is None or running_var is None:
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
            if bn.training and running_mean is not None and running_var is not None and tracked is not None:
                with torch.no_grad():
                    tracked.add_(1)
                    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(tracked.item())
                    n = x.numel() / x.shape[1]
                    running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                    running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1))
        else:
            mean, var = running_mean, running_var
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        return out


class explicit_batchnorm:
    """Context manager: every batch-norm layer of ``model`` computed by ``_ExplicitBatchNorm``, restored on exit.

    Parameters, buffers and the optimizer's references are untouched (the wrapper
    holds the original module); only the forward computation changes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> nn.Module:
        for parent in list(self.model.modules()):
            if isinstance(parent, _ExplicitBatchNorm):
                continue  # already swapped by an enclosing context
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, _ExplicitBatchNorm(child))
                    self._swapped.append((parent, name, child))
        return self.model

    def __exit__(self, *exc: object) -> None:
        for parent, name, child in reversed(self._swapped):
            setattr(parent, name, child)
        self._swapped = []


# --------------------------------------------------------------------------- TAP


def downscale_masks(mask: torch.Tensor, sizes: list[tuple[int, int]], kernel: int = 3) -> list[torch.Tensor]:
    """Paper 002 Eq. 7, applied cumulatively layer to layer: ``M^l = AvgPool(MaxPool_k,1(M^{l-1}), H^l, W^l)``.

    ``mask`` ``[N, 1, H, W]``; ``sizes`` the targeted layers' ``(H^l, W^l)`` in forward
    order. The max-pool (kernel ``k``, stride 1, padding ``k // 2``) widens the marked
    region by ``k // 2`` pixels; average pooling then shrinks by the size ratio
    (adaptive pooling, which is plain ``k = s = ratio`` pooling when the ratio is an
    integer). A layer larger than the previous map gets nearest interpolation.
    Returns one ``[N, 1, H^l, W^l]`` mask per layer.
    """
    out, cur = [], mask
    for h, w in sizes:
        cur = F.max_pool2d(cur, kernel, stride=1, padding=kernel // 2)
        ch, cw = cur.shape[-2:]
        if (h, w) != (ch, cw):
            cur = F.adaptive_avg_pool2d(cur, (h, w)) if h <= ch and w <= cw else \
                F.interpolate(cur, size=(h, w), mode="nearest")
        out.append(cur)
    return out


def activation_map(z: torch.Tensor) -> torch.Tensor:
    """Paper 002 Eq. 6: signed channel sum ``A^l = sum_c a_c`` of an activation ``[N, C, H, W]`` -> ``[N, 1, H, W]``."""
    return z.sum(dim=1, keepdim=True)


def tap_penalty(activations: list[torch.Tensor], mask: torch.Tensor, kernel: int = 3,
                norm: Literal["l2sq", "l1"] = "l2sq") -> torch.Tensor:
    """Paper 002 Eq. 8: ``mean_n (1/L) sum_l ||D(M, l) (.) A^l||`` over the targeted activations (forward order)."""
    if not activations:
        raise ConfigError("TAP needs at least one targeted layer")
    maps = [activation_map(a) for a in activations]
    masks = downscale_masks(mask, [tuple(a.shape[-2:]) for a in maps], kernel)  # type: ignore[misc]
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
    """Context manager: records the outputs of ``layers`` on every forward pass, hooks removed on exit.

    ``outputs`` holds the latest forward's activations in the order the layers ran.
    """

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ConfigError(f"model has no layer(s) {missing}")
        self.model, self.layers = model, list(layers)
        self._modules = [modules[n] for n in layers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.outputs: list[torch.Tensor] = []

    def _hook(self, _module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if out.dim() != 4:
            raise ConfigError(f"TAP layers must output [N, C, H, W] maps, got shape {tuple(out.shape)}")
        self.outputs.append(out)

    def clear(self) -> None:
        self.outputs = []

    def __enter__(self) -> "TargetedActivations":
        self._handles = [m.register_forward_hook(self._hook) for m in self._modules]
        self.outputs = []
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.outputs = [], []


def tap_loss(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, layers: list[str] | None = None,
             kernel: int = 3, norm: Literal["l2sq", "l1"] = "l2sq") -> torch.Tensor:
    """Targeted activation penalty (paper 002 Eq. 8) of ``model`` on ``x``; layers default to ``tap_layers``."""
    m = as_mask(mask, x)
    with TargetedActivations(model, layers or tap_layers(model)) as rec:
        model(x)
        return tap_penalty(rec.outputs, m, kernel, norm)


# --------------------------------------------------------------------------- training


class XSConfig(BaseModel):
    """Training with explanatory supervision: ``CE + lam * L_XS`` (paper 002 Eq. 3).

    Adam at learning rate 1e-3, as the other trainers here (the paper: SGD, 50 epochs);
    ``layers`` are TAP's targeted layers (default ``tap_layers``).
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


def xs_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, config: XSConfig,
                 recorder: TargetedActivations | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss ``CE + lam * L_XS`` of one batch from one forward pass, and its parts as floats.

    TAP reads its activations from ``recorder`` (entered on ``model`` by the caller).
    """
    m = as_mask(mask, x)
    method = config.method
    if method in ("rrr", "rbr"):
        x = x.detach().requires_grad_(True)
    if recorder is not None:
        recorder.clear()
    if method == "rbr" and config.lam != 0:
        with explicit_batchnorm(model):  # the fused batch-norm has no third derivative
            logits = model(x)
            ce = F.cross_entropy(logits, y)
            xs = rbr_penalty(influence_map(model, x, y, logits), input_gradient(logits, x), m)
        return ce + config.lam * xs, {"ce": float(ce.detach()), "xs": float(xs.detach())}
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    if method in ("none", "rbr") or config.lam == 0:
        xs = torch.zeros((), dtype=ce.dtype)
    elif method == "rrr":
        xs = rrr_penalty(input_gradient(logits, x), m)
    elif method == "tap":
        if recorder is None:
            raise ConfigError("TAP needs a TargetedActivations recorder around the model")
        xs = tap_penalty(recorder.outputs, m, config.tap_kernel, config.tap_norm)
    else:  # pragma: no cover - guarded by pydantic
        raise ConfigError(f"unknown XS method {method!r}; choose from {XS_METHODS}")
    return ce + config.lam * xs, {"ce": float(ce.detach()), "xs": float(xs.detach())}


def train_xs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, config: XSConfig,
             callback: Callable[[int, dict[str, float]], None] | None = None) -> nn.Module:
    """Train ``model`` in place on ``x`` ``[N, C, H, W]``, ``y`` ``[N]`` and masks with ``config``; eval mode after.

    ``callback(epoch, {"ce", "xs", "seconds"})`` receives each epoch's mean losses.
    Raises ``DataError`` for mismatched inputs and ``ModelRunError`` if the loss diverges.
    """
    from hansgate.errors import ModelRunError

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
