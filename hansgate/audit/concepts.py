"""Concept evidence for the report: TCAV rankings per class and CAV localisation heatmaps.

Built on ``audit.cav`` (CAVs) and ``audit.tcav`` (TCAV with its significance test against
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

from typing import Any

import numpy as np
import torch
from torch import nn

from hansgate.audit.attributions import attribute
from hansgate.audit.tcav import TcavConfig, tcav_test
from hansgate.concepts.cav import (
    ConceptActivationVector,
    default_concept_layer,
    pooled_activations,
)
from hansgate.concepts.gradients import latent_gradients

__all__ = ["CavProjection", "concept_sets", "concept_evidence"]


class CavProjection(nn.Module):
    """``x -> sum_{c, positions} a_c(x) h_c`` ``[N, 1]``: the quantity a CAV localisation heatmap explains.

    Wraps ``model`` (not copied, not changed); the hook on ``layer`` lives for one forward only.
    """

    cav: torch.Tensor

    def __init__(self, model: nn.Module, layer: str, cav: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.register_buffer("cav", cav.detach().float().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store: list[torch.Tensor] = []
        module = self.model.get_submodule(self.layer)
        handle = module.register_forward_hook(lambda m, i, o: store.append(o.clone()))  # in-place ReLUs follow
        try:
            self.model(x)
        finally:
            handle.remove()
        a = store[0]
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


def concept_evidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[str],
                     concepts: dict[str, tuple[torch.Tensor, torch.Tensor]], config: TcavConfig | None = None,
                     localise: list[str] | None = None, n_localise: int = 4,
                     max_per_class: int = 100) -> dict[str, Any]:
    """TCAV ranking per class and CAV localisation heatmaps for ``localise`` concepts.

    Returns ``{"layer", "config", "per_class": {class: ConceptRanking.as_dict()}, "localisation":
    {concept: {"images": [n, H, W], "heatmaps": [n, H, W]}}}`` (arrays as numpy).
    """
    cfg = config or TcavConfig()
    layer = default_concept_layer(model, x[:1])
    # activations once per concept and latent gradients once per class; tcav_test does the rest
    acts = {name: (pooled_activations(model, layer, torch.cat([a, b]), cfg.pooling),
                   torch.cat([torch.ones(len(a), dtype=torch.bool), torch.zeros(len(b), dtype=torch.bool)]))
            for name, (a, b) in concepts.items()}
    per_class: dict[str, Any] = {}
    for c, name in enumerate(classes):
        idx = (y == c).nonzero().flatten()[:max_per_class]
        if len(idx) < 2:
            continue
        grads = latent_gradients(model, layer, x[idx], [c])[:, 0]
        results = {k: tcav_test(grads, a, t, cfg, name=k, class_index=c) for k, (a, t) in acts.items()}
        # the order of audit.tcav.ConceptRanking: significant first, then by mean TCAV score
        ranking = sorted(results, key=lambda k: (not results[k].significant, -results[k].mean))
        per_class[name] = {"ranking": ranking, "results": {k: r.as_dict() for k, r in results.items()}}
    localisation: dict[str, Any] = {}
    for concept in localise or []:
        x_with, x_without = concepts[concept]
        xs = torch.cat([x_with, x_without])
        t = torch.cat([torch.ones(len(x_with)), torch.zeros(len(x_without))])
        cav = ConceptActivationVector(cfg.cav_kind, seed=cfg.seed).fit(
            pooled_activations(model, layer, xs, cfg.pooling), t).cav_
        sample = x_with[:n_localise]
        rel = attribute(CavProjection(model, layer, torch.as_tensor(cav)), sample, method="lrp-epsilon-zplus-box",
                        output_fn=lambda out: out)
        localisation[concept] = {"images": sample[:, 0].numpy(), "heatmaps": rel.sum(1).numpy()}
    return {"layer": layer, "config": cfg.model_dump(), "per_class": per_class, "localisation": localisation}
