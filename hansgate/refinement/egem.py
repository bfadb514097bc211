"""EGEM and PCA-EGEM: explanation-guided exposure minimization (paper 000, Sec. 3, 4.4).

What: EGEM (Eq. 5) scales each unit of a refined activation by
``c_i = E[a_i^2] / (E[a_i^2] + lambda)``; PCA-EGEM (Eq. 6) does the same in the PCA basis
of the refinement activations (``hansgate.refinement.pca``). ``ExposureMinimizer`` reads
the statistics (``fit``) and builds refined copies (``refine``); ``select_alpha`` is the
paper's selection protocol around it (Sec. 4.4, Supp. F.3).

Why: the refined model keeps the explanations of the verified data (Eq. 3) while its
exposure to what that data never exercised -- possibly an unseen Clever-Hans feature --
is pruned away.

Choices where the paper leaves room (each tested in tests/refinement/):

- Statistics for every refined layer are read on the *original* model in one streamed
  forward pass (moments, never the activations -- except on PCA layers with fewer samples
  than units, see ``pca``), as the authors' code does; lambda search needs no further pass.
  Its batches hold ``batch_size`` images, fewer for large images
  (``nn.training.forward_batch_size``: activation memory grows with batch times image size).
  The caller's train/eval flags are restored afterwards.
- Units follow the layer that *consumes* the activation (Eq. 3-4 are about the consumer's
  weights ``w_ij``): a map that a conv layer reads is refined per channel (spatial sums,
  Sec. 3.1); a map that is flattened into a linear layer is refined per element, as the
  authors' hooks do for the MNIST net (the flattened input of fc1). Element units are used
  up to ``max_element_units``; above that, channels.
- PCA layers with more samples than units decompose only the spectrum at fit time and
  build each refinement's projection by Cholesky (``solver="resolvent"``, default; the same
  matrix, see ``pca``); ``solver="eigh"`` keeps the float64 eigenbasis from fit.
- The mean pruning factor of a PCA layer is averaged over ``min(N, D)`` components (the
  authors' ``k``).
- lambda per layer: ``hansgate.refinement.schedule`` (the authors' doubling grid by
  default, ``lambda_rule="bisect"`` as an option); tau per layer: the triangular schedule
  there (``schedule="deep"`` default, as the authors' code).
- Selection (``select_alpha``): as the authors' code, ``repetitions`` (5) random 80/20
  splits of the verified data; each fits on its 80 % and scores every alpha on its 20 %;
  the validation accuracies (and the original's) are averaged over the splits, the slack
  rule picks alpha, and the model refined from the first split's 80 % fit is returned.
  ``final_fit="all"`` (the project's earlier protocol) refits on all verified data instead.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from hansgate.errors import ConfigError, DataError
from hansgate.nn.hooks import capture, eval_mode
from hansgate.nn.surgery import insert_after, resolve_layers, trace_calls
from hansgate.nn.units import ExposureScale
from hansgate.nn.training import accuracy, forward_batch_size
from hansgate.refinement.pca import (
    LayerMoments,
    MomentKind,
    PcaExposure,
    dual_basis,
    dual_resolvent_projection,
    dual_spectrum,
    exposure_from_projection,
    pca_basis,
    pca_spectrum,
    resolvent_projection,
)
from hansgate.refinement.schedule import (
    ALPHA_GRID,
    LAMBDA_START,
    egem_factors,
    mean_factor,
    search_lambda,
    triangular_schedule,
)
from hansgate.refinement.selection import Candidate, SlackSelection, select_by_slack, validation_split

__all__ = [
    "ALPHA_GRID",
    "LAMBDA_START",
    "EgemConfig",
    "LayerMoments",
    "ExposureScale",
    "PcaExposure",
    "egem_factors",
    "mean_factor",
    "search_lambda",
    "triangular_schedule",
    "pca_basis",
    "dual_basis",
    "ExposureMinimizer",
    "EgemSelection",
    "select_alpha",
]


class EgemConfig(BaseModel):
    """Hyper-parameters of EGEM / PCA-EGEM; ``alpha`` is picked by the slack rule when None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pca: bool = False
    layers: list[str] | None = None
    schedule: Literal["deep", "shallow"] = "deep"
    conv_mode: Literal["ratio", "linear"] = "ratio"
    lambda_rule: Literal["grid", "bisect"] = "grid"
    alpha: float | None = Field(None, gt=0, le=1)
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    slack: float = Field(0.05, ge=0, lt=1)
    val_share: float = Field(0.2, gt=0, lt=1)
    repetitions: int = Field(5, ge=1)
    final_fit: Literal["split", "all"] = "split"
    batch_size: int = Field(256, ge=1)
    max_element_units: int = Field(4096, ge=1)
    precision: Literal["float64", "float32"] = "float64"
    solver: Literal["resolvent", "eigh"] = "resolvent"
    seed: int = 0


def _units(a: torch.Tensor, per_element: bool) -> torch.Tensor:
    """Per-image unit activations ``[N, D]``: every element, or spatial sums per channel.

    A 3-D activation is a transformer's token sequence ``[N, T, D]`` (``nn.surgery``'s
    token blocks): its units are the ``D`` embedding dimensions, summed over the tokens
    as a conv map's channels are over space.
    """
    if per_element or a.ndim == 2:
        return a.flatten(1)
    if a.ndim == 3:
        return a.sum(1)
    return a.flatten(2).sum(2)


_SPATIAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


def _consumed_by_linear(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, bool]:
    """For each layer, whether a linear layer reads it element-wise (next weighted module, no pooling between)."""
    calls = trace_calls(model, x)
    out: dict[str, bool] = {}
    for name in layers:
        idx = [i for i, c in enumerate(calls) if c.name == name or c.name.startswith(name + ".")]
        pooled = False
        out[name] = False
        for c in calls[(idx[-1] + 1 if idx else 0):]:
            if isinstance(c.module, _SPATIAL_POOLS):
                pooled = True  # the consumer reads pooled channels, not positions
            # residual stages/blocks are traced as units; they start with a conv
            if isinstance(c.module, (nn.Conv2d, nn.Linear)) or list(c.module.children()):
                out[name] = isinstance(c.module, nn.Linear) and not pooled
                break
    return out


class ExposureMinimizer:
    """EGEM / PCA-EGEM in estimator shape.

    ``fit(model, x)`` streams ``x`` once through the original model and stores each refined
    layer's moments (``moments_``), second moments or PCA eigenvalues (``variances_``) and,
    for PCA, the basis (``bases_``); ``refine(model, alpha)`` returns a refined deep copy
    with real modules inserted. ``plan(alpha)`` gives the per-layer ``(tau, lambda)``.
    """

    def __init__(self, config: EgemConfig | None = None) -> None:
        self.config = config or EgemConfig()

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float32 if self.config.precision == "float32" else torch.float64

    def fit(self, model: nn.Module, x: torch.Tensor, progress: bool = False) -> "ExposureMinimizer":
        """Read the refinement statistics of ``model`` on ``x`` ``[N, ...]`` (eval mode, restored after)."""
        if x.ndim < 2 or len(x) == 0:
            raise DataError(f"refinement data must be a non-empty batch, got shape {tuple(x.shape)}")
        cfg = self.config
        with eval_mode(model), torch.no_grad():
            layers = resolve_layers(model, x[:2], cfg.layers)
            linear_next = _consumed_by_linear(model, x[:2], layers)
            per_element: dict[str, bool] = {}
            signed: dict[str, bool] = {}
            moments: dict[str, LayerMoments] = {}
            batch = forward_batch_size(int(torch.Size(x.shape[1:]).numel()), cap=cfg.batch_size)
            with capture(model, layers, copy=False) as store:
                for start in tqdm(range(0, len(x), batch), desc="statistics", disable=not progress, leave=False):
                    model(x[start : start + batch])
                    for name in layers:
                        a = store[name].pop()
                        store[name].clear()
                        if name not in per_element:
                            per_element[name] = linear_next[name] and a[0].numel() <= cfg.max_element_units
                        signed[name] = signed.get(name, False) or bool((a < 0).any())
                        s = _units(a, per_element[name])
                        if name not in moments:
                            shape = tuple(a.shape[1:]) if per_element[name] else tuple(a.shape[2:])
                            kind: MomentKind = "diag" if not cfg.pca else ("data" if len(x) <= s.shape[1] else "full")
                            moments[name] = LayerMoments.empty(s.shape[1], shape, kind, len(x))
                        moments[name].update(s, self._dtype)
        variances: dict[str, torch.Tensor] = {}
        bases: dict[str, torch.Tensor] = {}
        self._grams: dict[str, torch.Tensor] = {}
        self._eigenbases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, mom in moments.items():
            if not cfg.pca:
                variances[name] = mom.second
            elif cfg.solver == "resolvent" and mom.kind == "data":
                variances[name], self._grams[name] = dual_spectrum(mom.centred())  # the basis only if needed
            elif mom.kind == "data":
                variances[name], bases[name] = dual_basis(mom.centred())
            elif cfg.solver == "resolvent" and self._dtype == torch.float64:
                variances[name] = pca_spectrum(mom.covariance_lower())
            else:
                variances[name], bases[name] = pca_basis(mom.covariance, self._dtype)
        self.layers_, self.per_element_, self.moments_ = layers, per_element, moments
        # the ratio rule divides by channel sums: sound on non-negative (post-ReLU) maps only
        self.conv_modes_: dict[str, Literal["ratio", "linear"]] = {
            n: "linear" if signed[n] else cfg.conv_mode for n in layers}
        self.variances_, self.bases_ = variances, bases
        return self

    def _layer_module(self, name: str, lam: float) -> nn.Module:
        c = egem_factors(self.variances_[name], lam)
        mom = self.moments_[name]
        per_element = self.per_element_[name]
        if not self.config.pca:
            return ExposureScale(c.view(mom.spatial) if per_element else c)
        spatial = 1 if per_element else math.prod(mom.spatial)
        mode = self.conv_modes_[name]
        if name in self.bases_:
            return PcaExposure(mom.mean, self.bases_[name], c, spatial, mode, per_element)
        top = float(self.variances_[name][0]) if len(self.variances_[name]) else 0.0
        if mom.kind == "data":
            proj = dual_resolvent_projection(mom.centred(), self._grams[name], lam, top)
        else:
            proj = resolvent_projection(mom.covariance, lam, top)
        if proj is not None:
            return exposure_from_projection(mom.mean, proj, spatial, mode, per_element)
        if name not in self._eigenbases:  # lambda too close to the rank floor: the eigenbasis, once per fit
            self._eigenbases[name] = dual_basis(mom.centred()) if mom.kind == "data" else pca_basis(mom.covariance)
        evals, basis = self._eigenbases[name]
        return PcaExposure(mom.mean, basis, egem_factors(evals, lam), spatial, mode, per_element)

    def _search(self, name: str, tau: float) -> float:
        var = self.variances_[name]
        if self.config.pca:
            mom = self.moments_[name]
            var = var[: min(mom.n, mom.dim)]  # mean over the min(N, D) components that can exist
        return search_lambda(var, tau, rule=self.config.lambda_rule)

    def plan(self, alpha: float) -> dict[str, tuple[float, float]]:
        """``{layer: (tau, lambda)}`` for refinement parameter ``alpha`` (Sec. 4.4)."""
        if not hasattr(self, "moments_"):
            raise ConfigError("call fit() before refine()")
        taus = triangular_schedule(alpha, len(self.layers_), self.config.schedule)
        return {name: (tau, self._search(name, tau)) for name, tau in zip(self.layers_, taus)}

    def refine(self, model: nn.Module, alpha: float | None = None,
               lambdas: dict[str, float] | None = None, *, share_weights: bool = False) -> nn.Module:
        """A refined deep copy of ``model`` (eval mode): by target ``alpha`` (schedule) or explicit ``lambdas``.

        Also records that call's ``taus_`` and ``lambdas_`` (kept for callers that read them;
        ``plan`` returns the same without touching the estimator). ``share_weights``: the copy's
        modules are new but hold ``model``'s own parameters and buffers (no second set of weights),
        for a candidate that is only evaluated (``select_alpha``); never train such a copy.
        """
        if not hasattr(self, "moments_"):
            raise ConfigError("call fit() before refine()")
        if lambdas is None:
            if alpha is None:
                raise ConfigError("give alpha or explicit lambdas")
            plan = self.plan(alpha)
            self.taus_ = {name: tau for name, (tau, _) in plan.items()}
            lambdas = {name: lam for name, (_, lam) in plan.items()}
        self.lambdas_ = dict(lambdas)
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())} if share_weights else None
        refined = copy.deepcopy(model, memo).eval()
        insert_after(refined, {name: self._layer_module(name, lam) for name, lam in lambdas.items()})
        return refined


@dataclass
class EgemSelection:
    """The outcome of ``select_alpha``: the refined model, the fit that built it, the evidence."""

    model: nn.Module
    minimizer: ExposureMinimizer
    alpha: float
    taus: dict[str, float]
    lambdas: dict[str, float]
    selection: SlackSelection


def select_alpha(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: EgemConfig | None = None,
                 progress: bool = False) -> EgemSelection:
    """Sec. 4.4 / Supp. F.3: choose alpha by the slack rule, averaged over ``repetitions`` splits.

    Each repetition ``r`` splits the verified ``(x, y)`` with seed ``config.seed + r``
    (``val_share`` held out), fits on the rest and scores every alpha of ``alpha_grid`` on
    the held-out part; a given ``config.alpha`` is only scored, on the first split. Returns
    the model refined from the first split's fit (``final_fit="split"``) or from a refit on
    all data (``"all"``).
    """
    cfg = config or EgemConfig()
    if len(x) != len(y) or len(y) < 2:
        raise DataError(f"need at least 2 refinement samples with one label each, got {len(x)} and {len(y)}")
    # strongest (smallest alpha) first; a given alpha is only scored, on the first split
    grid = [cfg.alpha] if cfg.alpha is not None else sorted(cfg.alpha_grid)
    if not grid:
        raise ConfigError("alpha_grid is empty")
    reps = 1 if cfg.alpha is not None else cfg.repetitions
    first: ExposureMinimizer | None = None
    val_accs = [0.0] * len(grid)
    orig = 0.0
    with eval_mode(model):
        for r in range(reps):
            fit_idx, val_idx = validation_split(len(y), cfg.val_share, cfg.seed + r)
            em = ExposureMinimizer(cfg).fit(model, x[fit_idx], progress=progress)
            first = first or em
            orig += accuracy(model, x[val_idx], y[val_idx]) / reps
            for i, alpha in enumerate(grid):
                val_accs[i] += accuracy(em.refine(model, alpha, share_weights=True), x[val_idx], y[val_idx]) / reps
        assert first is not None
        sel = select_by_slack([Candidate({"alpha": a}, v) for a, v in zip(grid, val_accs)], orig, cfg.slack)
        alpha = float(sel.chosen.params["alpha"])
        final = first if cfg.final_fit == "split" else ExposureMinimizer(cfg).fit(model, x, progress=progress)
    plan = final.plan(alpha)
    refined = final.refine(model, lambdas={name: lam for name, (_, lam) in plan.items()})
    return EgemSelection(refined, final, alpha, {k: t for k, (t, _) in plan.items()},
                         {k: lam for k, (_, lam) in plan.items()}, sel)
