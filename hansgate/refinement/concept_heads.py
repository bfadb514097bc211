"""Concept heads in the exported graph: ``concept_scores`` and ``concept_sensitivity`` (DESIGN.md, the bundle).

The model is split at the concept layer into ``features`` and ``head`` (``split_at``,
torch.fx, sharing the model's modules). The exported module (``ConceptGraph``) returns

- ``logits`` ``[N, K]`` = ``head(a)`` with ``a = features(x)``;
- ``concept_scores`` ``[N, M]`` = ``(pool(a) - center_m) . h_m`` for unit CAVs ``h_m``
  (channel pooling as in ``concepts.cav``, mean by default), centred on the refinement
  data's mean pooled activation;
- ``concept_sensitivity`` ``[N, M, K]``: the directional derivative of every logit along
  every CAV, ``d/de f_k(a + e lift(h_m))`` (``concepts.cav.lift_cav``: for pooled CAVs the
  same offset at every spatial position; the direction ``audit.tcav`` differentiates along).
  The graph computes it **without autograd**. Default ``scheme="jvp"``: the exact
  forward-mode derivative through the head as plain ops (``nn.jvp``; all M
  directions in one batched pass), equal to autograd up to float32 rounding. Heads with
  an op ``nn.jvp`` has no rule for fall back to finite differences, ``central``
  ``(f(a + e h) - f(a - e h)) / 2e`` (2M extra head rows per sample) or ``forward``
  ``(f(a + e h) - f(a)) / e`` (M extra rows), the perturbed activations run through the
  head as one batch of ``(1 + 2M) N`` (or ``(1 + M) N``) rows.

For finite differences, the step ``e`` is ``epsilon_scale`` times the RMS activation per
element on the refinement data, a scale where float32 rounding and crossing a ReLU kink
are both small. ``ConceptHeads.check`` runs the exported graph with onnxruntime and
compares the sensitivity with torch autograd; it refuses the export (``ExportError``)
when ``|s_onnx - s_autograd| > tolerance * (1 + max |s_autograd|)`` anywhere, per concept.
The tolerance is ``1e-4`` for the JVP (float32 rounding of a different summation order)
and ``1e-2`` for finite differences; the manifest records it as ``sensitivity_tolerance``
and the scheme used as ``sensitivity_method``.

``watch_concept`` fits a watched concept from clean samples and the same samples with
the concept (for the demo: the artifact pasted), by default at ``default_watch_layer``
(the last conv layer with a nonlinearity between it and the logits, so that TCAV can move;
for full-map CAVs the max-pool closing its block; a named layer followed only by linear ops
gets a ``ConstantTcavWarning``; ``layer_reason`` records why): its signal-CAV, the centre, the
presence threshold (the score threshold with the best balanced accuracy between clean
and concept samples) and the baseline TCAV per class on the refinement data (per class
of the samples, the share whose sensitivity of that class's logit is positive —
what the service counts for predicted classes).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.fx
from torch import nn

from hansgate.concepts.cav import (
    ConceptActivationVector,
    default_concept_layer,
    layer_activations,
    lift_cav,
    pool_channels,
)
from hansgate.concepts.gradients import latent_gradients
from hansgate.errors import ConfigError, DataError, ExportError
from hansgate.manifest import ConceptSpec
from hansgate.nn.hooks import eval_mode
from hansgate.nn.jvp import Linearized, linearizable
from hansgate.nn.surgery import Refined, is_block, nonlinear_after, run_hooked, split_at, trace_calls

__all__ = ["ConceptGraph", "WatchedConcept", "ConceptHeads", "watch_concept", "default_watch_layer", "watch_layer",
           "ConstantTcavWarning",
           "presence_threshold", "SENSITIVITY_TOLERANCE", "Scheme"]

Scheme = Literal["jvp", "central", "forward"]
#: Agreement of the graph's sensitivity with autograd, relative to ``1 + max |s|`` per concept, by scheme.
SENSITIVITY_TOLERANCE: dict[str, float] = {"jvp": 1e-4, "central": 1e-2, "forward": 1e-2}


class ConceptGraph(nn.Module):
    """``x -> (logits, concept_scores, concept_sensitivity)``; see the module docstring."""

    cavs: torch.Tensor
    bias: torch.Tensor
    offsets: torch.Tensor

    def __init__(self, features: nn.Module, head: nn.Module, cavs: torch.Tensor, centers: torch.Tensor,
                 epsilon: float, pooling: str = "mean", scheme: Scheme = "jvp") -> None:
        super().__init__()
        if scheme not in SENSITIVITY_TOLERANCE:
            raise ConfigError(f"unknown sensitivity scheme {scheme!r}; choose from {list(SENSITIVITY_TOLERANCE)}")
        self.features = features
        self.head = Linearized(head, window_pools=True) if scheme == "jvp" else head
        self.pooling = pooling
        self.scheme = scheme
        self.epsilon = float(epsilon)
        m, c = cavs.shape
        self.register_buffer("cavs", cavs.float().clone())  # [M, C]
        self.register_buffer("bias", (centers.float() * cavs.float()).sum(1))  # [M]: center_m . h_m
        steps = [torch.zeros(c)]
        for h in cavs.float():
            steps += [self.epsilon * h, -self.epsilon * h] if scheme == "central" else [self.epsilon * h]
        self.register_buffer("offsets", torch.stack(steps))  # [R, C]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.features(x)
        scores = pool_channels(a, self.pooling) @ self.cavs.T - self.bias
        if isinstance(self.head, Linearized):
            directions = torch.stack([lift_cav(h, a, self.pooling)[0] for h in self.cavs])  # [M, C, ...]
            logits, sens = self.head(a, directions)
            return logits, scores, sens
        r = self.offsets.shape[0]
        lifted = torch.stack([lift_cav(o, a, self.pooling)[0] for o in self.offsets])  # [R, C, ...]
        rows = (a.unsqueeze(0) + lifted.unsqueeze(1)).reshape((-1,) + tuple(a.shape[1:]))
        out = self.head(rows)
        out = out.reshape(r, -1, out.shape[-1])
        if self.scheme == "central":
            fd = (out[1::2] - out[2::2]) / (2 * self.epsilon)
        else:
            fd = (out[1:] - out[0:1]) / self.epsilon
        return out[0], scores, fd.permute(1, 0, 2)


@dataclass
class WatchedConcept:
    """A concept the bundle watches: unit CAV ``[C]`` at ``layer``, its centre and deployment baselines."""

    name: str
    layer: str
    cav: torch.Tensor
    center: torch.Tensor
    cav_kind: str = "signal"
    pooling: str = "mean"
    baseline_tcav: dict[str, float] = field(default_factory=dict)
    presence_threshold: float = 0.0
    activation_rms: float = 1.0
    evidence: dict[str, Any] = field(default_factory=dict)
    #: why this layer (``watch_layer``'s rule, or the caller's choice and any warning); the manifest records it
    layer_reason: str | None = None


class ConceptHeads:
    """The object ``refinement.pipeline.build_bundle(concepts=...)`` takes.

    All concepts must share one layer and pooling. ``scheme``: ``jvp`` (exact; falls back
    to ``central`` when the head has an op without a derivative rule — ``scheme_`` says
    which was used once ``graph`` ran), ``central`` or ``forward``. ``epsilon_scale`` times
    the mean of the concepts' ``activation_rms`` is the finite-difference step.
    ``tolerance``: default by scheme (``SENSITIVITY_TOLERANCE``).
    """

    def __init__(self, concepts: list[WatchedConcept], scheme: Scheme = "jvp",
                 epsilon_scale: float = 3e-4, tolerance: float | None = None) -> None:
        if not concepts:
            raise ConfigError("no concepts to watch")
        if len({c.layer for c in concepts}) != 1 or len({c.pooling for c in concepts}) != 1:
            raise ConfigError("all watched concepts of a bundle must share one layer and pooling")
        if len({c.name for c in concepts}) != len(concepts):
            raise ConfigError("watched concept names must be unique")
        self.concepts = list(concepts)
        if scheme not in SENSITIVITY_TOLERANCE:
            raise ConfigError(f"unknown sensitivity scheme {scheme!r}; choose from {list(SENSITIVITY_TOLERANCE)}")
        self.scheme = scheme
        self.scheme_: Scheme = scheme
        self.epsilon_scale = epsilon_scale
        self._tolerance = tolerance
        self.layer = concepts[0].layer
        self.pooling = concepts[0].pooling
        self.epsilon = epsilon_scale * float(np.mean([c.activation_rms for c in concepts]))

    @property
    def tolerance(self) -> float:
        """The stated agreement with autograd for the scheme in use."""
        return self._tolerance if self._tolerance is not None else SENSITIVITY_TOLERANCE[self.scheme_]

    def graph(self, model: nn.Module) -> ConceptGraph:
        """The exported module for a copy of ``model`` (the caller's model and its mode stay untouched)."""
        features, head = split_at(copy.deepcopy(model).eval(), self.layer)
        cavs = torch.stack([c.cav.float() for c in self.concepts])
        centers = torch.stack([c.center.float() for c in self.concepts])
        self.scheme_ = "central" if self.scheme == "jvp" and not linearizable(head) else self.scheme
        return ConceptGraph(features, head, cavs, centers, self.epsilon, self.pooling, self.scheme_).eval()

    def specs(self) -> list[ConceptSpec]:
        return [ConceptSpec(name=c.name, layer=c.layer, cav_kind=c.cav_kind, pooling=c.pooling,
                            baseline_tcav=c.baseline_tcav, presence_threshold=c.presence_threshold,
                            sensitivity_tolerance=self.tolerance, sensitivity_method=self.scheme_,
                            layer_reason=c.layer_reason)
                for c in self.concepts]

    def reference_sensitivity(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Torch autograd: ``[N, M, K]`` directional derivatives of every logit along every CAV."""
        grads = latent_gradients(model, self.layer, x, pooling=self.pooling)  # [N, K, D]
        cavs = torch.stack([c.cav.float() for c in self.concepts])  # [M, C]
        return torch.einsum("nkc,mc->nmk", grads.float(), cavs)

    def sensitivity_errors(self, onnx_sensitivity: np.ndarray, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        """Per concept: max absolute error, the reference scale ``max |s|`` and the relative error."""
        ref = self.reference_sensitivity(model, x).numpy()
        got = np.asarray(onnx_sensitivity, dtype=np.float64)
        out: dict[str, Any] = {}
        for m, c in enumerate(self.concepts):
            err = float(np.abs(got[:, m] - ref[:, m]).max())
            scale = float(np.abs(ref[:, m]).max())
            out[c.name] = {"max_abs_error": err, "max_abs_sensitivity": scale, "relative_error": err / (1 + scale),
                           "sign_agreement": float((np.sign(got[:, m]) == np.sign(ref[:, m])).mean())}
        return out

    def check(self, onnx_bytes: bytes | Path, model: nn.Module, x: torch.Tensor,
              x_model: torch.Tensor | None = None) -> dict[str, Any]:
        """Run the graph with onnxruntime on ``x`` and compare with autograd; ``ExportError`` past tolerance.

        ``x_model``: the same samples as ``model`` sees them, when the graph normalises ``x``
        itself (``nn.normalisation.Normalised``); ``x`` by default.
        """
        from hansgate.nn.export import run_onnx

        outs = run_onnx(onnx_bytes, x.numpy().astype(np.float32))
        if len(outs) != 3:
            raise ExportError(f"the exported graph has {len(outs)} outputs, expected 3 with concept heads")
        errors = self.sensitivity_errors(outs[2], model, x if x_model is None else x_model)
        for name, e in errors.items():
            if not np.isfinite(e["relative_error"]) or e["relative_error"] > self.tolerance:
                raise ExportError(f"concept {name!r}: graph sensitivity differs from autograd by {e['max_abs_error']:.3g} "
                                  f"(> {self.tolerance:g} x (1 + {e['max_abs_sensitivity']:.3g})); no bundle written")
        return errors


def presence_threshold(clean_scores: torch.Tensor, concept_scores: torch.Tensor) -> float:
    """Score threshold with the best balanced accuracy of ``score > threshold`` (midpoints of sorted scores)."""
    s = torch.cat([clean_scores, concept_scores]).double()
    t = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(concept_scores))]).bool()
    order = s.argsort()
    s, t = s[order], t[order]
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("the presence threshold needs samples with and without the concept")
    # threshold after position i: negatives at <= i count as correct, positives above i as correct
    neg_below = torch.cumsum((~t).double(), 0)
    pos_above = n_pos - torch.cumsum(t.double(), 0)
    bal = 0.5 * (neg_below / n_neg + pos_above / n_pos)
    bal[:-1][s[1:] == s[:-1]] = -1.0  # cannot split between equal scores
    i = int(bal.argmax())
    if i + 1 == len(s):
        return float(s[i]) + 1.0
    # the midpoint, unless float32 scores (what the graph emits) cannot tell it from either side
    lo, hi = np.float32(s[i]), np.float32(s[i + 1])
    mid = np.float32((float(s[i]) + float(s[i + 1])) / 2)
    return float(mid) if lo <= mid < hi else float(lo)


class ConstantTcavWarning(UserWarning):
    """A watched concept sits at a layer followed only by linear ops: its TCAV cannot move."""


def _past_pool(model: nn.Module, example: torch.Tensor, layer: str) -> str:
    """The max-pool closing ``layer``'s block (through its ReLU), else ``layer`` (a pool wrapped by
    ``insert_after``, e.g. by EGEM, is read after its refinement module)."""
    calls = trace_calls(model, example)
    at = [i for i, c in enumerate(calls) if c.name == layer]
    for call in calls[at[-1] + 1:] if at else []:
        if isinstance(call.module, nn.MaxPool2d):
            parent = call.name.rpartition(".")[0]
            wrapped = call.name.endswith(".inner") and isinstance(model.get_submodule(parent), Refined)
            return parent if wrapped else call.name
        if not isinstance(call.module, nn.ReLU):
            break
    return layer


def _conv_candidates(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv layers from the last that runs backwards, each as its outermost enclosing block (``TOKEN_BLOCKS``
    and the residual blocks ``nn.surgery`` knows), without repeats; the first is ``default_concept_layer``."""
    first = default_concept_layer(model, example)
    named = dict(model.named_modules())
    order: list[str] = []

    def record(name: str) -> Callable[[nn.Module, object, object], None]:
        return lambda mod, inp, out: order.append(name)

    run_hooked(model, example[:1], [(m, record(n)) for n, m in named.items() if n and isinstance(m, nn.Conv2d)])
    out = [first]
    for name in reversed(order):
        parts = name.split(".")
        blocks = [".".join(parts[:i]) for i in range(1, len(parts)) if is_block(named[".".join(parts[:i])])]
        cand = blocks[0] if blocks else name
        if cand not in out:
            out.append(cand)
    return out


def _is_cut(model: nn.Module, layer: str) -> bool:
    try:
        split_at(model, layer)
    except ConfigError:
        return False
    return True


def default_watch_layer(model: nn.Module, example: torch.Tensor, pooling: str) -> str:
    """The layer a watched concept reads unless one is named (``watch_layer`` gives the reason too)."""
    return watch_layer(model, example, pooling)[0]


def watch_layer(model: nn.Module, example: torch.Tensor, pooling: str) -> tuple[str, str]:
    """``(layer, reason)``: the last conv layer (paper 001, Sec. 4.1; its enclosing residual block if
    any) that has a nonlinearity between it and the logits (``nn.surgery.nonlinear_after``), or,
    for a full-map CAV (``pooling="none"``), the max-pool that closes that layer's block.

    Why a nonlinearity: with only linear ops after the layer (e.g. a ResNet's last block,
    followed by average pooling and the linear head) the directional derivative along a CAV
    is the same for every input, so TCAV is 0 or 1 per class whatever is served. Why past the
    pool for full-map CAVs: through a max-pool, the full-map JVP must pick the CAV at every
    window's maximum per sample and concept; after the pool the tangent is a constant, so the
    heads cost less (``benchmarks/concepts_bench.py`` measures both layers).
    """
    skipped: list[str] = []
    for cand in _conv_candidates(model, example):
        layer = _past_pool(model, example, cand) if pooling == "none" else cand
        if not _is_cut(model, layer):
            continue
        if not nonlinear_after(model, layer):
            skipped.append(layer)
            continue
        reason = "automatic: the last conv layer (or its enclosing block) with a nonlinearity between it and the logits"
        if layer != cand:
            reason += f"; read after the max-pool closing {cand}'s block (full-map CAV)"
        if skipped:
            reason += f"; skipped {', '.join(skipped)}: only linear ops follow, so TCAV there would be constant"
        return layer, reason
    raise ConfigError("found no conv layer with a nonlinearity between it and the logits to watch; name the layer")


def _named_layer_reason(model: nn.Module, layer: str) -> str:
    """The reason for a layer the caller named, with a ``ConstantTcavWarning`` when only linear ops follow it."""
    try:
        constant = not nonlinear_after(model, layer)
    except ConfigError:
        return "named by the caller (not checked for a nonlinearity: the model cannot be split there)"
    if not constant:
        return "named by the caller; a nonlinearity lies between it and the logits"
    msg = (f"watched layer {layer!r} is followed only by linear ops up to the logits: the concept's directional "
           "derivative is the same for every input, so its TCAV is constant (0 or 1 per class); "
           "choose an earlier layer")
    warnings.warn(msg, ConstantTcavWarning, stacklevel=4)
    return f"named by the caller; warning: {msg}"


def watch_concept(model: nn.Module, name: str, x_clean: torch.Tensor, x_concept: torch.Tensor,
                  x_reference: torch.Tensor, y_reference: torch.Tensor, classes: list[str], layer: str | None = None,
                  kind: str = "signal", pooling: str = "mean", seed: int = 0) -> WatchedConcept:
    """Fit a watched concept (see the module docstring).

    ``x_clean`` / ``x_concept``: samples without / with the concept (e.g. clean refinement
    samples and the same with the artifact pasted); ``x_reference``, ``y_reference``: the
    refinement data, for the centre and the baseline TCAV per class.
    """
    with eval_mode(model):
        return _watch(model, name, x_clean, x_concept, x_reference, y_reference, classes, layer, kind, pooling, seed)


def _watch(model: nn.Module, name: str, x_clean: torch.Tensor, x_concept: torch.Tensor, x_reference: torch.Tensor,
           y_reference: torch.Tensor, classes: list[str], layer: str | None, kind: str, pooling: str,
           seed: int) -> WatchedConcept:
    if layer is None:
        layer, reason = watch_layer(model, x_reference[:1], pooling)
    else:
        reason = _named_layer_reason(model, layer)
    a_clean = pool_channels(layer_activations(model, layer, x_clean), pooling)
    a_concept = pool_channels(layer_activations(model, layer, x_concept), pooling)
    cav = ConceptActivationVector(kind, seed=seed).fit(torch.cat([a_clean, a_concept]),
                                                     torch.cat([torch.zeros(len(a_clean)),
                                                                torch.ones(len(a_concept))]).bool())
    ref_full = layer_activations(model, layer, x_reference)
    center = pool_channels(ref_full, pooling).mean(0)
    rms = float(ref_full.double().pow(2).mean().sqrt())
    threshold = presence_threshold((a_clean - center) @ cav.cav_, (a_concept - center) @ cav.cav_)
    sens = latent_gradients(model, layer, x_reference, pooling=pooling).float() @ cav.cav_  # [N, K]
    baseline = {}
    for k, cname in enumerate(classes):
        members = y_reference == k
        if members.any():
            baseline[cname] = float((sens[members, k] > 0).float().mean())
    evidence = {"cav": cav.as_dict(), "n_clean": len(x_clean), "n_concept": len(x_concept),
                "n_reference": len(x_reference)}
    return WatchedConcept(name=name, layer=layer, cav=cav.cav_, center=center, cav_kind=kind, pooling=pooling,
                          baseline_tcav=baseline, presence_threshold=threshold, activation_rms=rms or 1.0,
                          evidence=evidence, layer_reason=reason)
