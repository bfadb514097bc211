"""Explanatory supervision (XS) loss terms: RRR, RBR and TAP (papers 002, 004).

Each term takes the model, a batch ``x`` [N, C, H, W] and a mask [N, 1, H, W] or
[N, H, W] that is 1 on the pixels the model must not use, and returns a scalar that
is added to the task loss: ``CE + lambda * L_XS`` (paper 002, Eq. 3).
"""

from __future__ import annotations

import torch
from torch import nn

from hansgate.errors import DataError

__all__ = ["rrr_loss", "as_mask"]


def as_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Validate a mask against a batch and return it as float [N, 1, H, W]."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
        raise DataError(
            f"mask of shape {tuple(mask.shape)} does not fit inputs of shape {tuple(x.shape)}; "
            "expected [N, 1, H, W] or [N, H, W]"
        )
    return mask.to(dtype=x.dtype, device=x.device)


def rrr_loss(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Label-agnostic "right for the right reasons" penalty (paper 002 Eq. 4, Ross et al. 2017).

    ``mean_n sum_ij [M (.) sum_c d(sum_k log softmax_k f(x_n))/dx_c]_ij^2``: the input
    gradient of the summed log-probabilities, summed over channels, masked, squared
    and summed over pixels, averaged over the batch. Built with ``create_graph=True``
    so that it can be minimised (a second-order term).
    """
    m = as_mask(mask, x)
    x = x.detach().requires_grad_(True)
    log_probs = torch.log_softmax(model(x), dim=1)
    (grad,) = torch.autograd.grad(log_probs.sum(), x, create_graph=True)
    masked = m * grad.sum(dim=1, keepdim=True)
    return masked.pow(2).sum(dim=(1, 2, 3)).mean()
