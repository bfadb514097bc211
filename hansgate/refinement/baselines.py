"""The paper's baselines (paper 000, Sec. 4.2, Supp. D, F.3): RGEM, Ridge (DFR), Retrain.

RGEM and Ridge replace the last linear layer by a closed-form ridge solution on its
input features ``A`` (Supp. D, Eq. 26): ``W = (A^T A / n + lambda I')^-1 A^T Y / n``
with a column of ones for the bias, which is not penalised (``I'`` has a zero there).
RGEM regresses the original model's logits, Ridge (DFR) the one-hot true labels.
Moments are accumulated in streamed batches (float64), in eval mode with the caller's
train/eval flags restored afterwards. Retrain (Supp. F.3) fine-tunes a copy with Adam,
batch-norm frozen (running statistics *and* affine parameters: "frozen batch-norm
parameters") and the gradient norm clipped. The learning rate is the caller's: Supp. F.3
sets it per model, from 1e-3 (the MNIST net) down to 5e-6 (ResNet50); a rate fit for a
small net can wreck a deep batch-norm network in its first epoch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hansgate.errors import ConfigError
from hansgate.nn.hooks import capture, eval_mode
from hansgate.nn.surgery import trace_calls
from hansgate.nn.training import TrainConfig, accuracy, batches, frozen_batchnorm

__all__ = ["RIDGE_LAMBDAS", "RETRAIN_EPOCHS", "last_linear", "ridge_moments", "ridge_solve", "with_last_layer",
           "retrain_checkpoints"]

#: Supp. F.3 / authors' code: 10^-4 ... 10^4.
RIDGE_LAMBDAS: tuple[float, ...] = tuple(10.0**k for k in range(-4, 5))
#: Supp. F.3.
RETRAIN_EPOCHS: tuple[int, ...] = (1, 5, 10, 20, 30, 50, 100)


def last_linear(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the linear layer that runs last (the one producing the logits)."""
    with eval_mode(model):
        linears = [c.name for c in trace_calls(model, example) if isinstance(c.module, nn.Linear)]
    if not linears:
        raise ConfigError("RGEM/Ridge need a model whose last layer is nn.Linear")
    return linears[-1]


@torch.no_grad()
def ridge_moments(model: nn.Module, layer: str, x: torch.Tensor, targets: torch.Tensor | None,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^T A / n, A^T Y / n)`` with ``A`` = [input of ``layer``, 1] (float64).

    With ``targets`` None, ``Y`` is the model's own logits (RGEM); else ``targets``.
    """
    gram = cross = None
    n = 0
    with eval_mode(model), capture(model, [layer], what="input") as store:
        for idx in batches(len(x), batch_size):
            logits = model(x[idx])
            a = torch.cat([store[layer].pop().flatten(1), torch.ones(len(idx), 1)], 1).double()
            y = (logits if targets is None else targets[idx]).double()
            gram = a.T @ a if gram is None else gram + a.T @ a
            cross = a.T @ y if cross is None else cross + a.T @ y
            n += len(idx)
    assert gram is not None and cross is not None
    return gram / n, cross / n


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Supp. D, Eq. 26 with an unpenalised bias: returns ``(weight [K, D], bias [K])``."""
    penalty = torch.full((gram.shape[0],), lam, dtype=gram.dtype)
    penalty[-1] = 0.0
    sol = torch.linalg.solve(gram + torch.diag(penalty), cross)
    return sol[:-1].T.float(), sol[-1].float()


def with_last_layer(model: nn.Module, layer: str, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` whose linear ``layer`` has the given parameters."""
    out = copy.deepcopy(model).eval()
    lin = out.get_submodule(layer)
    assert isinstance(lin, nn.Linear)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if lin.bias is None:
            lin.bias = nn.Parameter(bias.clone())
        else:
            lin.bias.copy_(bias)
    return out


def retrain_checkpoints(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor,
                        y_val: torch.Tensor, epochs: tuple[int, ...] = RETRAIN_EPOCHS,
                        config: TrainConfig | None = None, clip: float = 1e-3) -> dict[int, tuple[float, dict]]:
    """Fine-tune a copy with Adam (batch-norm frozen, gradient norm clipped, Supp. F.3).

    Returns ``{epochs: (val_acc, state_dict)}`` at each checkpoint of one run.
    """
    cfg = config or TrainConfig()
    work = copy.deepcopy(model)
    # Supp. F.3: "frozen batch-norm parameters": running statistics (eval mode) and the affine weights
    norm_params = {id(p) for m in work.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters()}
    trained = [p for p in work.parameters() if id(p) not in norm_params]
    opt = torch.optim.Adam(trained, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[int, tuple[float, dict]] = {}
    done = 0
    for target in sorted(epochs):
        with frozen_batchnorm(work):
            for _ in range(target - done):
                for idx in batches(len(y), cfg.batch_size, gen):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(work(x[idx]), y[idx]).backward()
                    nn.utils.clip_grad_norm_(trained, clip)
                    opt.step()
        done = target
        out[target] = (accuracy(work, x_val, y_val), copy.deepcopy(work.state_dict()))
    return out
