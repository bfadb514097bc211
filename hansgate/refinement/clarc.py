"""The ClArC family: P-ClArC, A-ClArC and RR-ClArC (paper 001, Sec. 3.2, 3.3, 4.4).

All three model a concept (a shortcut) by a unit CAV ``h`` at the concept layer
(``audit.cav``). Default ``pooling="none"``: the CAV lives in the full activation map
``C x H x W``. The paper's code pools channels (spatial max) and moves every position
by the same offset; on the embedded data, where a 3-pixel corner artifact reaches the
head through a few positions of a flattening classifier, a channel-pooled direction
cannot express *where* the artifact is, and RR-ClArC with it barely moved the biased
accuracy (exploratory runs on small_vgg/corner, 3 epochs: biased accuracy Vanilla 0.59 -> RR-ClArC
0.70 with ``mean``, Vanilla 0.54 -> RR-ClArC 0.92 with ``none``); ``mean``/``max`` remain available, and ``benchmarks/concepts_bench.py``
reports the CAV alignment for both.

- **P-ClArC** (Eq. 3, no training): a ``ClarcProjection`` module is inserted after the
  concept layer; it moves every activation along ``h`` so that its pooled length
  ``pool(a) . h`` equals the mean length over clean samples:
  ``a' = a + (z - pool(a) . h) / (h . h) * h``.
- **A-ClArC**: the same projection with ``z`` = the mean length over samples *with*
  the concept, applied to every sample while the layers after the concept layer are
  fine-tuned; the returned model is the fine-tuned one *without* the projection
  (the augmentation teaches invariance, as data augmentation does; this choice is ours).
- **RR-ClArC** (Eq. 5): fine-tuning with ``CE + lambda * mean_n ((grad_a [m . f(a)] . h)^2)``,
  the gradient averaged over spatial positions (the authors' code). ``grad_a [m . f] . h`` is
  the directional derivative of ``m . f`` along ``h``, computed in forward mode
  (``refinement.jvp``) so a step needs one ordinary backward pass; heads with ops outside
  ``refinement.jvp`` use the authors' double backward (``create_graph=True``). ``m``: ``random`` (a fresh +-1 per sample and logit; the
  paper's default), ``all`` (ones), or ``class`` (one-hot on ``target_class``:
  class-specific unlearning, Sec. 4.4). Beyond the paper, the penalty is also evaluated on
  the concept-carrying samples of the concept data (``x_penalty``, no labels needed):
  when the training data shows the artifact on one class only, few of its points
  activate the shortcut, and penalising the sensitivity where it is active is what
  moves TCAV towards 0.5 on the embedded data.

Fine-tuning (A-/RR-ClArC and the plain baseline) freezes every layer up to and
including the concept layer, as Eq. 6 requires: the model is split there
(``refinement.concept_heads.split_at``), the frozen part runs in eval mode without
gradients, only the head's parameters train (batch-norm in the head frozen too, as
the authors' code does). Because the frozen part is deterministic, its outputs can be
computed once (``cache_features``) — mathematically the same training, much cheaper.
Optimiser: Adam (``lr`` 3e-3, ``epochs`` 10, batch 64) rather than the paper's SGD
1e-4 for 10 epochs, because the embedded data is small.

``lambda`` is chosen on a validation split of the concept data: the value with the best
*balanced* accuracy over held-out samples with and without the concept (ties: the
larger lambda); the candidates are kept as evidence.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.concepts.cav import (
    ConceptActivationVector,
    default_concept_layer,
    layer_activations,
    lift_cav,
    pool_channels,
    pool_gradient,
)
from hansgate.errors import ConfigError, DataError
from hansgate.nn.jvp import Linearized, UnsupportedOp
from hansgate.nn.surgery import insert_after, split_at
from hansgate.nn.training import accuracy, batches

__all__ = [
    "CLARC_METHODS",
    "ClarcConfig",
    "ConceptData",
    "ClarcProjection",
    "project_along",
    "annotation_vector",
    "rr_penalty",
    "with_projection",
    "FineTuner",
    "ClarcResult",
    "fit_concept",
    "refine_clarc",
]

CLARC_METHODS: tuple[str, ...] = ("p-clarc", "a-clarc", "rr-clarc")
#: RR-ClArC lambda grid (a subset of the paper's 0.05 ... 1e8, wide enough for the built-ins).
RR_LAMBDAS: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


class ClarcConfig(BaseModel):
    """Options of the ClArC methods (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "rr-clarc"
    layer: str | None = None
    cav_kind: str = "signal"
    pooling: str = "none"
    mode: Literal["random", "all", "class"] = "random"
    target_class: int | None = None
    lambdas: tuple[float, ...] = RR_LAMBDAS
    epochs: int = Field(10, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    val_share: float = Field(0.3, gt=0, lt=1)
    cache_features: bool = True
    seed: int = 0


@dataclass(frozen=True)
class ConceptData:
    """Samples labelled for one concept: ``x`` ``[N, C, H, W]``, ``y`` ``[N]``, ``concept`` ``[N]`` bool."""

    x: torch.Tensor
    y: torch.Tensor
    concept: torch.Tensor

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.concept)):
            raise DataError(f"concept data: x, y and concept need the same length, got {len(self.x)}, {len(self.y)}, "
                            f"{len(self.concept)}")
        n_pos = int(self.concept.sum())
        if n_pos < 4 or len(self.concept) - n_pos < 4:
            raise DataError(f"concept data needs at least 4 samples with and 4 without the concept (got {n_pos} and "
                            f"{len(self.concept) - n_pos})")

    def split(self, val_share: float, seed: int) -> tuple["ConceptData", "ConceptData"]:
        """Stratified (fit, validation) split by the concept flag."""
        gen = torch.Generator().manual_seed(seed)
        val = torch.zeros(len(self.y), dtype=torch.bool)
        for flag in (True, False):
            idx = (self.concept == flag).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            val[idx[: max(2, int(round(val_share * len(idx))))]] = True
        return (ConceptData(self.x[~val], self.y[~val], self.concept[~val]),
                ConceptData(self.x[val], self.y[val], self.concept[val]))


# --------------------------------------------------------------------------- math


def project_along(a: torch.Tensor, cav: torch.Tensor, target: float | torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Paper 001, Eq. 3: ``a + (z - pool(a) . h) / (h . h) * h`` at every position; ``a`` ``[N, C, ...]``."""
    length = pool_channels(a, pooling) @ cav.to(a)  # [N]
    gamma = (target - length) / (cav.to(a) @ cav.to(a))
    return a + gamma.view((-1,) + (1,) * (a.dim() - 1)) * lift_cav(cav, a, pooling)


def annotation_vector(n: int, k: int, mode: str, target_class: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``m`` ``[N, K]`` of Eq. 5: random +-1 per sample and logit, all ones, or one-hot on ``target_class``."""
    if mode == "random":
        return torch.randint(0, 2, (n, k), generator=generator).float() * 2 - 1
    if mode == "all":
        return torch.ones(n, k)
    if mode == "class":
        if target_class is None or not 0 <= target_class < k:
            raise ConfigError(f"class-specific RR-ClArC needs a target class in [0, {k}), got {target_class}")
        return F.one_hot(torch.full((n,), target_class), k).float()
    raise ConfigError(f"unknown RR-ClArC mode {mode!r}; choose random, all or class")


def rr_penalty(latent_grad: torch.Tensor, cav: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Paper 001, Eq. 5: ``mean_n (g_n . h)^2`` for ``g`` ``[N, C, ...]`` along ``lift_cav(h)``.

    For ``mean``/``max`` pooling the gradient is averaged over positions (the authors' code;
    a constant factor ``1 / (H W)`` against the summed derivative that TCAV uses).
    """
    g = pool_gradient(latent_grad, pooling)
    if latent_grad.dim() > 2 and pooling != "none":
        g = g / latent_grad.flatten(2).shape[2]
    return (g @ cav.to(g)).pow(2).mean()


class ClarcProjection(nn.Module):
    """Eq. 3 as a module, inserted after the concept layer (P-ClArC; A-ClArC while training)."""

    cav: torch.Tensor
    target: torch.Tensor

    def __init__(self, cav: torch.Tensor, target: float, pooling: str = "mean") -> None:
        super().__init__()
        self.register_buffer("cav", cav.float().clone())
        self.register_buffer("target", torch.tensor(float(target)))
        self.pooling = pooling

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return project_along(a, self.cav, self.target, self.pooling)


def with_projection(model: nn.Module, layer: str, cav: torch.Tensor, target: float, pooling: str = "mean") -> nn.Module:
    """A copy of ``model`` with a ``ClarcProjection`` after ``layer`` (P-ClArC); ``model`` is unchanged."""
    out = copy.deepcopy(model).eval()
    return insert_after(out, {layer: ClarcProjection(cav, target, pooling)}).eval()


# --------------------------------------------------------------------------- fine-tuning


def _head_train_mode(head: nn.Module) -> None:
    head.train()
    for m in head.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class FineTuner:
    """Fine-tunes the layers after the concept layer of a *copy* of a model (estimator shape).

    ``objective``: ``plain`` (cross-entropy), ``rr`` (RR-ClArC, needs ``cav`` and ``lam``),
    ``a-clarc`` (projection to ``target`` before the head), ``rrr`` (input-gradient penalty of
    ``refinement.xs.rrr_loss``, needs ``masks``; the full model runs every step).
    ``double_backward``: compute RR-ClArC's penalty by double backward even where forward mode works.
    Learned: ``model_`` (eval mode), ``seconds_``, ``steps_``.
    """

    def __init__(self, layer: str, config: ClarcConfig, objective: str = "plain", cav: torch.Tensor | None = None,
                 lam: float = 0.0, target: float | None = None, double_backward: bool = False) -> None:
        if objective not in ("plain", "rr", "a-clarc", "rrr"):
            raise ConfigError(f"unknown fine-tuning objective {objective!r}")
        if objective in ("rr", "a-clarc") and cav is None:
            raise ConfigError(f"{objective} needs a CAV")
        if objective == "a-clarc" and target is None:
            raise ConfigError("a-clarc needs a target projection length")
        self.layer, self.config, self.objective, self.cav, self.lam, self.target = layer, config, objective, cav, lam, target
        self.double_backward = double_backward
        self._lin_for: nn.Module | None = None
        self._lin: Linearized | None = None

    def prepare(self, model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, torch.optim.Optimizer]:
        """``(copy, features, head, optimizer)`` with the features frozen (no ``requires_grad``)."""
        tuned = copy.deepcopy(model).eval()
        features, head = split_at(tuned, self.layer)
        head_params = {id(p) for p in head.parameters()}
        for p in features.parameters():
            if id(p) not in head_params:
                p.requires_grad_(False)
        params = [p for p in head.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"nothing to fine-tune after layer {self.layer!r}")
        return tuned, features, head, torch.optim.Adam(params, lr=self.config.lr)

    def step(self, features: nn.Module, head: nn.Module, opt: torch.optim.Optimizer, y: torch.Tensor,
             x: torch.Tensor | None = None, a: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, a_extra: torch.Tensor | None = None) -> float:
        """One optimiser step on a batch; pass ``x`` (features run here) or cached ``a``.

        ``a_extra``: activations of concept samples on which only the RR penalty is evaluated.
        """
        cfg = self.config
        opt.zero_grad(set_to_none=True)
        if self.objective == "rrr":
            from hansgate.refinement.xs import rrr_loss

            if x is None or mask is None:
                raise ConfigError("the RRR objective needs the input batch and its mask")
            full = _Composed(features, head)
            loss = F.cross_entropy(full(x), y) + self.lam * rrr_loss(full, x, mask)
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
                loss = F.cross_entropy(head(a.clone()), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def _rr_loss(self, head: nn.Module, a: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Eq. 5 on activations ``a`` (the first ``len(y)`` rows labelled).

        The penalty's ``grad_a [m . f(a)] . h`` is the directional derivative of ``m . f``
        along ``lift_cav(h)``: computed by forward mode (``refinement.jvp``), so the step needs
        one first-order backward pass; a head without derivative rules uses the double
        backward (``create_graph=True``) instead. Both give the same value and gradient.
        """
        assert self.cav is not None  # checked in __init__
        cfg, n = self.config, len(y)
        lin = self._linearized(head)
        if lin is None:
            leaf = a.detach().requires_grad_(True)
            logits = head(leaf * 1.0)  # a non-leaf input: the head may start with an in-place ReLU
            m = annotation_vector(len(leaf), logits.shape[1], cfg.mode, cfg.target_class, generator)
            (g,) = torch.autograd.grad((m * logits).sum(), leaf, create_graph=True)
            return F.cross_entropy(logits[:n], y) + self.lam * rr_penalty(g, self.cav, cfg.pooling)
        logits, deriv = lin(a, lift_cav(self.cav, a, cfg.pooling))  # [N, K], [N, 1, K]
        m = annotation_vector(len(a), logits.shape[1], cfg.mode, cfg.target_class, generator)
        along = (m * deriv[:, 0]).sum(1)
        if a.dim() > 2 and cfg.pooling != "none":  # averaged over positions, as rr_penalty does
            along = along / a[0, 0].numel()
        return F.cross_entropy(logits[:n], y) + self.lam * along.pow(2).mean()

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
        """Fine-tune on ``x``, ``y``; RR-ClArC also evaluates its penalty on batches of ``x_penalty``."""
        cfg = self.config
        if self.objective == "rrr" and masks is None:
            raise ConfigError("RRR needs input masks")
        t0 = time.perf_counter()
        tuned, features, head, opt = self.prepare(model)
        cached = None
        if cfg.cache_features and self.objective != "rrr":
            with torch.no_grad():
                cached = torch.cat([features(x[i : i + 512]) for i in range(0, len(x), 512)])
        extra = None
        if x_penalty is not None and len(x_penalty) and self.objective == "rr":
            with torch.no_grad():
                extra = torch.cat([features(x_penalty[i : i + 512]) for i in range(0, len(x_penalty), 512)])
        gen = torch.Generator().manual_seed(cfg.seed)
        self.steps_ = 0
        for _ in range(cfg.epochs):
            _head_train_mode(head)
            for idx in batches(len(y), cfg.batch_size, gen):
                self.step(features, head, opt, y[idx], x=None if cached is not None else x[idx],
                          a=None if cached is None else cached[idx], mask=None if masks is None else masks[idx],
                          generator=gen, a_extra=None if extra is None else
                          extra[torch.randint(0, len(extra), (len(idx),), generator=gen)])
                self.steps_ += 1
        for p in tuned.parameters():
            p.requires_grad_(True)
        self.model_ = tuned.eval()
        self.seconds_ = time.perf_counter() - t0
        return self


class _Composed(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- the methods


@dataclass
class ClarcResult:
    """A corrected model and the evidence of how it was made."""

    model: nn.Module
    method: str
    layer: str
    cav: ConceptActivationVector
    hyperparameters: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def fit_concept(model: nn.Module, layer: str, data: ConceptData, kind: str = "signal", pooling: str = "mean",
                seed: int = 0) -> tuple[ConceptActivationVector, float, float]:
    """CAV on ``data`` plus the mean pooled lengths ``(z_clean, z_concept)`` along it (P-/A-ClArC targets)."""
    acts = pool_channels(layer_activations(model, layer, data.x), pooling)
    cav = ConceptActivationVector(kind, seed=seed).fit(acts, data.concept)
    lengths = acts @ cav.cav_
    return cav, float(lengths[~data.concept].mean()), float(lengths[data.concept].mean())


def balanced_accuracy(model: nn.Module, data: ConceptData) -> float:
    """Mean of the accuracies on the samples with and without the concept."""
    c = data.concept
    return 0.5 * (accuracy(model, data.x[c], data.y[c]) + accuracy(model, data.x[~c], data.y[~c]))


def refine_clarc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, concept: ConceptData,
                 config: ClarcConfig | None = None) -> ClarcResult:
    """Correct ``model`` for ``concept`` with ``config.method``; fine-tunes on ``x``, ``y`` (not for P-ClArC).

    The concept data is split (``val_share``, stratified): the CAV and the ClArC targets come
    from the fit part; lambda (RR-ClArC) is chosen on the validation part (module docstring).
    """
    cfg = config or ClarcConfig()
    if cfg.method not in CLARC_METHODS:
        raise ConfigError(f"unknown ClArC method {cfg.method!r}; choose from {list(CLARC_METHODS)}")
    if cfg.method != "p-clarc" and (len(x) != len(y) or len(y) < 2):
        raise DataError(f"fine-tuning needs labelled samples, got {len(x)} images and {len(y)} labels")
    model = model.eval()
    layer = cfg.layer or default_concept_layer(model, concept.x[:1])
    t0 = time.perf_counter()
    fit_part, val_part = concept.split(cfg.val_share, cfg.seed)
    cav, z_clean, z_concept = fit_concept(model, layer, fit_part, cfg.cav_kind, cfg.pooling, cfg.seed)
    hp: dict[str, Any] = {"layer": layer, "cav_kind": cfg.cav_kind, "pooling": cfg.pooling, "cav": cav.as_dict()}
    timings = {"cav_s": time.perf_counter() - t0}
    candidates: list[dict[str, Any]] = []
    if cfg.method == "p-clarc":
        refined = with_projection(model, layer, cav.cav_, z_clean, cfg.pooling)
        hp |= {"target_length": z_clean}
    elif cfg.method == "a-clarc":
        tuner = FineTuner(layer, cfg, "a-clarc", cav.cav_, target=z_concept).fit(model, x, y)
        refined = tuner.model_
        hp |= {"target_length": z_concept, "epochs": cfg.epochs, "lr": cfg.lr}
        timings["finetune_s"] = tuner.seconds_
    else:
        best: tuple[float, float, nn.Module] | None = None
        for lam in sorted(cfg.lambdas, reverse=True):
            tuner = FineTuner(layer, cfg, "rr", cav.cav_, lam=lam).fit(model, x, y,
                                                                        x_penalty=fit_part.x[fit_part.concept])
            score = balanced_accuracy(tuner.model_, val_part)
            candidates.append({"lambda": lam, "val_balanced_acc": score, "seconds": tuner.seconds_})
            if best is None or score > best[1]:
                best = (lam, score, tuner.model_)
        assert best is not None
        refined = best[2]
        hp |= {"lambda": best[0], "val_balanced_acc": best[1], "mode": cfg.mode, "target_class": cfg.target_class,
               "epochs": cfg.epochs, "lr": cfg.lr,
               "selection": "max balanced accuracy on held-out concept data (ties: larger lambda)"}
        timings["selection_s"] = time.perf_counter() - t0 - timings["cav_s"]
    hp["val_balanced_acc_original"] = balanced_accuracy(model, val_part)
    hp["val_balanced_acc_refined"] = balanced_accuracy(refined, val_part)
    return ClarcResult(refined, cfg.method, layer, cav, hp, candidates, timings)
