"""Latent gradients and the TCAV score (paper 001, Eq. 9), shared by the exported heads and the audit.

``G[n, k] = d f_k / d a`` at the concept layer, pooled as the CAV is (``concepts.cav``),
so that the directional derivative along a CAV ``h`` is one matrix product ``G @ h`` and
every CAV (the concept's and random ones) reuses the same gradients. The significance
test and rankings built on these live in ``hansgate.audit.tcav``.
"""

from __future__ import annotations

import torch
from torch import nn

from hansgate.concepts.cav import pool_gradient
from hansgate.errors import ConfigError, DataError, ModelRunError
from hansgate.nn.hooks import eval_mode, leaf_outputs
from hansgate.nn.training import gradient_batch_size

__all__ = ["latent_gradients", "directional_derivatives", "tcav_score"]


def latent_gradients(model: nn.Module, layer: str, x: torch.Tensor, classes: list[int] | None = None,
                     pooling: str = "mean", batch_size: int | None = None) -> torch.Tensor:
    """``G`` ``[N, K', D]``: ``d logit_k / d a`` at ``layer``, pooled by ``concepts.cav.pool_gradient`` (autograd).

    For ``mean``/``max`` pooling the gradient is summed over positions (``D = C``); for
    ``none`` it is flattened (``D = C * H * W``); either way ``G @ h`` is the derivative along the CAV.

    ``classes`` selects the logits (default: all, in order). Eval mode; parameters get no gradients.
    ``batch_size`` ``None``: ``nn.training.gradient_batch_size`` (at most 128).
    """
    if len(x) == 0:
        raise DataError("no target samples for TCAV")
    batch_size = batch_size or gradient_batch_size(int(x[0].numel()), cap=128)
    parts = []
    try:
        with eval_mode(model), leaf_outputs(model, layer) as store, torch.enable_grad():
            for i in range(0, len(x), batch_size):
                store.clear()
                logits = model(x[i : i + batch_size])
                if len(store) != 1:
                    raise ConfigError(f"layer {layer!r} runs {len(store)} times per forward pass; need exactly once")
                leaf = store[0]
                ks = classes if classes is not None else list(range(logits.shape[1]))
                grads = []
                for j, k in enumerate(ks):
                    (g,) = torch.autograd.grad(logits[:, k].sum(), leaf, retain_graph=j < len(ks) - 1)
                    grads.append(pool_gradient(g, pooling))
                parts.append(torch.stack(grads, 1))
    except RuntimeError as exc:
        raise ModelRunError(f"cannot differentiate the model at {layer!r}: {str(exc).splitlines()[0]}") from exc
    return torch.cat(parts)


def directional_derivatives(grads: torch.Tensor, cav: torch.Tensor) -> torch.Tensor:
    """``grads`` ``[N, K, C]`` (or ``[N, C]``) times CAV ``[C]`` -> ``[N, K]`` (or ``[N]``): ``grad_a f . h``."""
    return grads.float() @ cav.float()


def tcav_score(derivatives: torch.Tensor) -> float:
    """Paper 001, Eq. 9: share of samples with a positive directional derivative (``[N]``)."""
    if derivatives.numel() == 0:
        raise DataError("TCAV needs at least one sample")
    return float((derivatives > 0).float().mean())
