"""Fine-tuning the layers after a concept layer: Vanilla, A-ClArC and RR-ClArC (paper 001, Sec. 3.3, Eq. 5, 6).

The model is split at the concept layer (``nn.surgery.split_at``); the part up to it runs
in eval mode without gradients, as Eq. 6 requires (the CAV must stay valid), and so can
be computed once (``cache_features``: the same training, much cheaper). What else is
frozen is ``ClarcConfig.freeze``: the reference code freezes every conv and batch-norm
layer, so only the linear layers after the concept layer train. Batch-norm always runs on
its running statistics while fine-tuning (``nn.training.frozen_batchnorm``).

RR-ClArC's penalty ``grad_a [m . f(a)] . h`` is the directional derivative of ``m . f``
along ``lift_cav(h)``: computed in forward mode (``nn.jvp``), so a step needs one ordinary
backward pass; a head with ops outside ``nn.jvp`` uses the authors' double backward
(``create_graph=True``). Both give the same value and parameter gradient.

An input-level penalty (RRR of paper 002, ``refinement.xs.rrr_loss``) can be plugged in
as ``input_penalty``: the ClArC fine-tuner knows no XS loss, it only runs the full model
when the penalty needs the input.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hansgate.concepts.cav import lift_cav
from hansgate.errors import ConfigError
from hansgate.nn.jvp import Linearized, UnsupportedOp
from hansgate.nn.surgery import split_at
from hansgate.nn.training import batches, frozen_batchnorm
from hansgate.refinement.clarc_core import (
    ClarcConfig,
    annotation_vector,
    class_weights,
    project_along,
    rr_penalty,
)

__all__ = ["OBJECTIVES", "InputPenalty", "FineTuner"]

#: ``plain`` cross-entropy (Vanilla), ``rr`` (RR-ClArC), ``a-clarc``, ``input`` (CE + an input-level penalty).
OBJECTIVES: tuple[str, ...] = ("plain", "rr", "a-clarc", "input")
#: ``penalty(model, x, mask) -> scalar``, e.g. ``refinement.xs.rrr_loss``.
InputPenalty = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class _Composed(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FineTuner:
    """Fine-tunes the layers after the concept layer of a *copy* of a model (estimator shape).

    ``objective``: ``plain``, ``rr`` (needs ``cav`` and ``lam``), ``a-clarc`` (projection to
    ``target`` before the head, needs ``cav``), ``input`` (``CE + lam * input_penalty``,
    needs the masks in ``fit``). ``double_backward``: RR-ClArC's penalty by double backward
    even where forward mode works. Learned in ``fit``: ``model_`` (eval mode), ``seconds_``,
    ``steps_``, ``diverged_`` (a non-finite loss stopped the training), ``class_weights_``.
    """

    def __init__(self, layer: str, config: ClarcConfig, objective: str = "plain", cav: torch.Tensor | None = None,
                 lam: float = 0.0, target: float | None = None, double_backward: bool = False,
                 input_penalty: InputPenalty | None = None) -> None:
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown fine-tuning objective {objective!r}; choose from {list(OBJECTIVES)}")
        if objective in ("rr", "a-clarc") and cav is None:
            raise ConfigError(f"{objective} needs a CAV")
        if objective == "a-clarc" and target is None:
            raise ConfigError("a-clarc needs a target projection length")
        if objective == "input" and input_penalty is None:
            raise ConfigError("the input objective needs an input_penalty (e.g. refinement.xs.rrr_loss)")
        self.layer, self.config, self.objective, self.cav, self.lam, self.target = layer, config, objective, cav, lam, target
        self.double_backward = double_backward
        self.input_penalty = input_penalty
        self._lin_for: nn.Module | None = None
        self._lin: Linearized | None = None

    def prepare(self, model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, torch.optim.Optimizer]:
        """``(copy, features, head, optimizer)``: the features and what ``config.freeze`` names frozen."""
        cfg = self.config
        tuned = copy.deepcopy(model).eval()
        features, head = split_at(tuned, self.layer)
        head_params = {id(p) for p in head.parameters()}
        for p in features.parameters():
            if id(p) not in head_params:
                p.requires_grad_(False)
        if cfg.freeze == "conv_bn":
            for m in head.modules():
                if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
        params = [p for p in head.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"nothing to fine-tune after layer {self.layer!r} (freeze={cfg.freeze!r})")
        opt: torch.optim.Optimizer
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        else:
            opt = torch.optim.Adam(params, lr=cfg.lr)
        return tuned, features, head, opt

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights = getattr(self, "class_weights_", None)
        w = None if weights is None else weights.to(logits)[: logits.shape[1]]
        return F.cross_entropy(logits, y, weight=w)

    def step(self, features: nn.Module, head: nn.Module, opt: torch.optim.Optimizer, y: torch.Tensor,
             x: torch.Tensor | None = None, a: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, a_extra: torch.Tensor | None = None) -> float:
        """One optimiser step on a batch; pass ``x`` (features run here) or cached ``a``; returns the loss.

        ``a_extra``: activations of concept samples on which only the RR penalty is evaluated
        (``penalty_samples="concept"``).
        """
        cfg = self.config
        opt.zero_grad(set_to_none=True)
        if self.objective == "input":
            if x is None or mask is None or self.input_penalty is None:
                raise ConfigError("an input-level penalty needs the input batch and its mask")
            full = _Composed(features, head)
            loss = self._ce(full(x), y) + self.lam * self.input_penalty(full, x, mask)
        else:
            if a is None:
                with torch.no_grad():
                    a = features(x)
            if self.objective == "a-clarc":
                assert self.cav is not None and self.target is not None  # checked in __init__
                a = project_along(a, self.cav, self.target, cfg.pooling)
            if self.objective == "rr":
                loss = self._rr_loss(head, a if a_extra is None else torch.cat([a, a_extra]), y, generator)
            else:
                loss = self._ce(head(a.clone()), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def _rr_loss(self, head: nn.Module, a: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Eq. 5 on activations ``a`` (the first ``len(y)`` rows labelled): ``CE + lam * mean_n (d_n)^2``.

        ``d_n = grad_a [m_n . f(a_n)] . h``, the gradient averaged over positions for
        channel CAVs (``rr_penalty``).
        """
        assert self.cav is not None  # checked in __init__
        cfg, n = self.config, len(y)
        lin = self._linearized(head)
        if lin is None:
            leaf = a.detach().requires_grad_(True)
            logits = head(leaf * 1.0)  # a non-leaf input: the head may start with an in-place ReLU
            m = annotation_vector(len(leaf), logits.shape[1], cfg.mode, cfg.target_class, generator)
            (g,) = torch.autograd.grad((m * logits).sum(), leaf, create_graph=True)
            return self._ce(logits[:n], y) + self.lam * rr_penalty(g, self.cav, cfg.pooling)
        logits, deriv = lin(a, lift_cav(self.cav, a, cfg.pooling))  # [N, K], [N, 1, K]
        m = annotation_vector(len(a), logits.shape[1], cfg.mode, cfg.target_class, generator)
        along = (m * deriv[:, 0]).sum(1)
        if a.dim() > 2 and cfg.pooling != "none":  # averaged over positions, as rr_penalty does
            along = along / a[0, 0].numel()
        return self._ce(logits[:n], y) + self.lam * along.pow(2).mean()

    def _linearized(self, head: nn.Module) -> Linearized | None:
        """The head's forward-mode derivative, built once per head; ``None`` if it has no rules."""
        if self.double_backward:
            return None
        if self._lin_for is not head:
            self._lin_for, self._lin = head, None
            try:
                self._lin = Linearized(head)
            except UnsupportedOp:
                pass
        return self._lin

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor | None = None,
            x_penalty: torch.Tensor | None = None) -> "FineTuner":
        """Fine-tune a copy of ``model`` on ``x``, ``y``; ``model`` and its mode are unchanged.

        ``x_penalty``: concept samples on which RR-ClArC also evaluates its penalty (one per
        labelled row of each batch, drawn with replacement).
        """
        cfg = self.config
        if self.objective == "input" and masks is None:
            raise ConfigError("an input-level penalty needs input masks")
        t0 = time.perf_counter()
        tuned, features, head, opt = self.prepare(model)
        with torch.no_grad():
            k = int(head(features(x[:1])).shape[1])
        self.class_weights_ = class_weights(y, k) if cfg.class_weighted else None
        cached = None
        if cfg.cache_features and self.objective != "input":
            with torch.no_grad():
                cached = torch.cat([features(x[i : i + 512]) for i in range(0, len(x), 512)])
        extra = None
        if x_penalty is not None and len(x_penalty) and self.objective == "rr":
            with torch.no_grad():
                extra = torch.cat([features(x_penalty[i : i + 512]) for i in range(0, len(x_penalty), 512)])
        gen = torch.Generator().manual_seed(cfg.seed)
        steps, diverged = 0, False
        with frozen_batchnorm(head):
            for _ in range(cfg.epochs):
                for idx in batches(len(y), cfg.batch_size, gen):
                    loss = self.step(features, head, opt, y[idx], x=None if cached is not None else x[idx],
                                     a=None if cached is None else cached[idx],
                                     mask=None if masks is None else masks[idx], generator=gen,
                                     a_extra=None if extra is None else
                                     extra[torch.randint(0, len(extra), (len(idx),), generator=gen)])
                    steps += 1
                    if not torch.isfinite(torch.tensor(loss)):
                        diverged = True
                        break
                if diverged:
                    break
        for p in tuned.parameters():
            p.requires_grad_(True)
        self.model_ = tuned.eval()
        self.steps_, self.diverged_ = steps, diverged
        self.seconds_ = time.perf_counter() - t0
        return self
