"""Concept evidence for the report: TCAV rankings per class and CAV localisation heatmaps.

Built on ``concepts.cav`` (CAVs) and ``audit.tcav`` (TCAV with its significance test against
random CAVs). Concepts come from what the audit knows without extra labels:

- every tested artifact, as the concept "the image carries it": samples with the artifact
  pasted vs the same samples without it;
- every declared subgroup attribute value (e.g. ``stroke=thick``): samples with that value vs
  samples with the others.

For each class the concepts are ranked on the samples of that class as ``audit.tcav.ConceptRanking``
does (significant first, then by mean TCAV score); activations are computed once per concept and
latent gradients once per class, instead of once per (class, concept) pair. The CAV localisation heatmap of a concept
(paper 001, Sec. 4.2) is the LRP attribution (``epsilon z+ b`` composite) not of a logit but
of the projection ``a . h`` of the concept layer's activation on the unit CAV, summed over
positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hansgate.audit.attributions import attribute
from hansgate.audit.tcav import TcavConfig, TcavResult, tcav_test
from hansgate.concepts.cav import (
    ConceptActivationVector,
    default_concept_layer,
    pooled_activations,
)
from hansgate.concepts.gradients import latent_gradients
from hansgate.nn.surgery import split_at

__all__ = ["CavProjection", "concept_sets", "ClassConcepts", "Localisation", "ConceptEvidence", "concept_evidence"]


class CavProjection(nn.Module):
    """``x -> sum_{c, positions} a_c(x) h_c`` ``[N, 1]``: the quantity a CAV localisation heatmap explains.

    ``a`` is ``layer``'s output, before any in-place activation that follows it. The model is cut at
    ``layer`` (``nn.surgery.split_at``; shared modules, nothing copied or changed), so no hook is needed
    and the layers after it do not run.
    """

    cav: torch.Tensor

    def __init__(self, model: nn.Module, layer: str, cav: torch.Tensor) -> None:
        super().__init__()
        self.features, _ = split_at(model, layer)
        self.layer = layer
        self.register_buffer("cav", cav.detach().float().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        h = self.cav.view(1, -1, *([1] * (a.dim() - 2)))
        return (a * h).flatten(1).sum(1, keepdim=True)


def concept_sets(x: torch.Tensor, attributes: dict[str, np.ndarray], pasted: dict[str, torch.Tensor],
                 clean_index: dict[str, np.ndarray], max_per_side: int = 200,
                 seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{concept: (x_with, x_without)}`` from pasted artifacts and attribute values (each side capped)."""
    rng = np.random.default_rng(seed)

    def cap(idx: np.ndarray) -> torch.Tensor:
        if len(idx) > max_per_side:
            idx = np.sort(rng.choice(idx, max_per_side, replace=False))
        return torch.as_tensor(idx)

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, xp in pasted.items():
        sel = cap(np.arange(len(xp)))
        out[f"artifact:{name}"] = (xp[sel], x[torch.as_tensor(clean_index[name])][sel])
    for attr, values in attributes.items():
        for v in sorted(set(values.tolist())):
            pos, neg = np.flatnonzero(values == v), np.flatnonzero(values != v)
            if len(pos) >= 2 and len(neg) >= 2:
                out[f"{attr}={v}"] = (x[cap(pos)], x[cap(neg)])
    return out


@dataclass(frozen=True)
class ClassConcepts:
    """The concepts of one class, ranked as ``audit.tcav.ConceptRanking`` ranks them, with their tests."""

    ranking: list[str]
    results: dict[str, TcavResult]

    def as_dict(self) -> dict[str, object]:
        return {"ranking": self.ranking, "results": {k: r.as_dict() for k, r in self.results.items()}}


@dataclass(frozen=True)
class Localisation:
    """Images ``[n, H, W]`` (first channel) carrying a concept and their CAV localisation heatmaps ``[n, H, W]``."""

    images: np.ndarray
    heatmaps: np.ndarray


@dataclass(frozen=True)
class ConceptEvidence:
    """TCAV rankings per class at ``layer`` and the localisation heatmaps of the localised concepts."""

    layer: str
    config: TcavConfig
    per_class: dict[str, ClassConcepts]
    localisation: dict[str, Localisation] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The report's layout (the heatmaps go to the figures, not to the JSON)."""
        return {"layer": self.layer, "config": self.config.model_dump(),
                "per_class": {c: r.as_dict() for c, r in self.per_class.items()}}


def concept_evidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[str],
                     concepts: dict[str, tuple[torch.Tensor, torch.Tensor]], config: TcavConfig | None = None,
                     localise: list[str] | None = None, n_localise: int = 4,
                     max_per_class: int = 100) -> ConceptEvidence:
    """TCAV ranking per class and CAV localisation heatmaps for ``localise`` concepts."""
    cfg = config or TcavConfig()
    layer = default_concept_layer(model, x[:1])
    # activations once per concept and latent gradients once per class; tcav_test does the rest
    acts = {name: (pooled_activations(model, layer, torch.cat([a, b]), cfg.pooling),
                   torch.cat([torch.ones(len(a), dtype=torch.bool), torch.zeros(len(b), dtype=torch.bool)]))
            for name, (a, b) in concepts.items()}
    per_class: dict[str, ClassConcepts] = {}
    for c, name in enumerate(classes):
        idx = (y == c).nonzero().flatten()[:max_per_class]
        if len(idx) < 2:
            continue
        grads = latent_gradients(model, layer, x[idx], [c])[:, 0]
        results = {k: tcav_test(grads, a, t, cfg, name=k, class_index=c) for k, (a, t) in acts.items()}
        # the order of audit.tcav.ConceptRanking: significant first, then by mean TCAV score
        ranking = sorted(results, key=lambda k: (not results[k].significant, -results[k].mean))
        per_class[name] = ClassConcepts(ranking, results)
    localisation: dict[str, Localisation] = {}
    for concept in localise or []:
        x_with, x_without = concepts[concept]
        xs = torch.cat([x_with, x_without])
        t = torch.cat([torch.ones(len(x_with)), torch.zeros(len(x_without))])
        cav = ConceptActivationVector(cfg.cav_kind, seed=cfg.seed).fit(
            pooled_activations(model, layer, xs, cfg.pooling), t).cav_
        sample = x_with[:n_localise]
        rel = attribute(CavProjection(model, layer, torch.as_tensor(cav)), sample, method="lrp-epsilon-zplus-box",
                        output_fn=lambda out: out)
        localisation[concept] = Localisation(sample[:, 0].numpy(), rel.sum(1).numpy())
    return ConceptEvidence(layer, cfg, per_class, localisation)
