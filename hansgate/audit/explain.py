"""The report sections that need torch models: attributions, known-artifact tests, concepts, influence.

Each section is one function returning one typed dataclass (or ``sections.Skipped`` with the
reason); ``as_dict`` gives its ``report.json`` layout, and the arrays the figures are drawn
from stay on the dataclass, outside the JSON. Torch models arrive keyed by role and take
normalised inputs (``audit.roles``); sections that paste artifacts on raw pixels wrap them with
``roles.raw_pixel_model``. The sections that explain one model (the attribution methods figure,
TCAV, influence) explain the served model (role ``after``) when the audit holds it
(``audit.served``), else the first model; every section names the model it explains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from hansgate.audit.artifact_tests import (
    ArtifactLike,
    ArtifactTcav,
    ArtifactTestConfig,
    ArtifactTests,
    HeatmapFigure,
    carries,
    known_artifact_tests,
)
from hansgate.audit.attributions import (
    ATTRIBUTION_METHODS,
    AttributionConfig,
    attribute,
    method_for,
    relevance_share_in_mask,
)
from hansgate.audit.concepts import ConceptEvidence, concept_evidence, concept_sets
from hansgate.audit.config import AuditConfig
from hansgate.audit.influence import (
    InfluenceConfig,
    InfluenceReport,
    LinearStudentInfluence,
)
from hansgate.audit.roles import PredictFn, raw_pixel_model, standardise
from hansgate.audit.sections import Predictions, Skipped
from hansgate.audit.served import explained_name
from hansgate.audit.tcav import TcavConfig
from hansgate.manifest import InputSpec
from hansgate.nn.training import predict_logits

__all__ = ["sample_indices", "explained_role", "AttributionSample", "AttributionSection", "attributions_section",
           "artifacts_section", "ConceptSection", "concepts_section", "InfluenceSection", "influence_section"]


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` sorted indices of ``range(n)`` drawn with ``seed`` (all of them when ``k >= n``)."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def explained_role(torch_models: Mapping[str, nn.Module]) -> str:
    """The role a one-model section explains: the served model (``after``) when present, else the first."""
    return "after" if "after" in torch_models else next(iter(torch_models))


@dataclass
class AttributionSample:
    """One explained sample: its label, each model's prediction, and the verification rule per torch model."""

    index: int
    label: str
    predicted: dict[str, str]
    region_share: dict[str, float] = field(default_factory=dict)
    verified: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"index": self.index, "label": self.label, "predicted": self.predicted}
        if self.region_share:
            out["region_share"], out["verified"] = self.region_share, self.verified
        return out


@dataclass
class AttributionSection:
    """LRP heatmaps of every torch model on a seeded sample, the verification rule, every method on four."""

    models: list[str]
    composite: str
    n: int
    samples: list[AttributionSample]
    accept_share: float
    region_mask: str | None
    methods_model: str
    heatmaps: HeatmapFigure
    methods: HeatmapFigure
    explained: str = "logit of the class the model predicts"
    #: per model: the method actually used and why it differs (LRP has no sound rule for attention)
    methods_used: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def verified_share(self) -> dict[str, float]:
        return {m: float(np.mean([s.verified[m] for s in self.samples])) for m in self.models}

    def mean_region_share(self) -> dict[str, float]:
        return {m: float(np.mean([s.region_share[m] for s in self.samples])) for m in self.models}

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "status": "done", "models": self.models, "explains": {m: explained_name(m) for m in self.models},
            "composite": self.composite, "explained": self.explained,
            "n": self.n, "samples": [s.as_dict() for s in self.samples], "accept_share": self.accept_share,
            "region_mask": self.region_mask}
        if self.region_mask is not None:
            out["verified_share"], out["mean_region_share"] = self.verified_share(), self.mean_region_share()
        out["methods_model"], out["methods"] = self.methods_model, list(ATTRIBUTION_METHODS)
        out["methods_explains"] = explained_name(self.methods_model)
        out["methods_used"], out["notes"] = self.methods_used, self.notes
        return out


def attributions_section(x: torch.Tensor, y: torch.Tensor, classes: list[str], predictions: Predictions,
                         torch_models: Mapping[str, nn.Module], spec: InputSpec, cfg: AuditConfig,
                         region_mask: torch.Tensor | None = None, region_mask_name: str | None = None,
                         positions: np.ndarray | None = None) -> AttributionSection | Skipped:
    """LRP (``cfg.lrp_method``) of the predicted class's logit for ``cfg.heatmaps`` seeded samples; with a
    region mask, paper 000 Supp. F.1's rule: verified when >= ``accept_share`` of |relevance| lies inside.
    ``positions``: where ``x``'s samples sit in the audited data (a held subset), for the report's indices."""
    if not torch_models:
        return Skipped("no torch model (source weights not found)")
    if cfg.heatmaps <= 0:
        return Skipped("no heatmaps requested")
    attr_cfg = AttributionConfig(value_range=tuple(spec.value_range), seed=cfg.seed)
    idx = sample_indices(len(y), cfg.heatmaps, cfg.seed)
    xs = torch.from_numpy(standardise(x[torch.as_tensor(idx)].numpy(), spec))
    where = positions if positions is not None else np.arange(len(y))
    samples = [AttributionSample(int(where[i]), classes[int(y[i])], {m: classes[int(p[i])]
                                                              for m, p in predictions.predicted.items()})
               for i in idx]
    heat: dict[str, np.ndarray] = {}
    used: dict[str, str] = {}
    notes: dict[str, str] = {}
    for m, net in torch_models.items():
        target = predict_logits(net, xs).argmax(1)
        used[m], note = method_for(net, cfg.lrp_method, attr_cfg)
        if note:
            notes[m] = note
        rel = attribute(net, xs, target, cfg.lrp_method, attr_cfg)
        heat[m] = rel.sum(1).numpy()
        if region_mask is not None:
            for s, v in zip(samples, relevance_share_in_mask(rel, region_mask).tolist()):
                s.region_share[m] = v
                s.verified[m] = bool(v >= cfg.accept_share)
    # every method on a few samples of the served model, else the first torch model (paper 003, Fig. 2A)
    first = explained_role(torch_models)
    few = xs[:4]
    few_t = predict_logits(torch_models[first], few).argmax(1)
    maps = {meth: attribute(torch_models[first], few, few_t, meth, attr_cfg).sum(1).numpy()
            for meth in ATTRIBUTION_METHODS}
    return AttributionSection(
        models=list(torch_models), composite=cfg.lrp_method, n=int(len(idx)), samples=samples,
        accept_share=cfg.accept_share, region_mask=region_mask_name if region_mask is not None else None,
        methods_model=first,
        heatmaps=HeatmapFigure(x[torch.as_tensor(idx[:8])][:, 0].numpy(), {m: h[:8] for m, h in heat.items()}),
        methods=HeatmapFigure(x[torch.as_tensor(idx[:4])][:, 0].numpy(), maps), methods_used=used, notes=notes)


def artifacts_section(predictors: Mapping[str, PredictFn], torch_models: Mapping[str, nn.Module],
                      x: torch.Tensor, y: torch.Tensor, classes: list[str], predictions: Predictions,
                      artifacts: list[ArtifactLike], spec: InputSpec, cfg: AuditConfig) -> ArtifactTests:
    """Paste every artifact on the samples without it; flip rate, accuracy drop, relevance in its mask
    (``audit.artifact_tests``). Artifacts are pasted on raw pixels, so torch models get the manifest's
    normalisation in front."""
    art_cfg = ArtifactTestConfig(flip_threshold=cfg.flip_threshold, accuracy_drop_threshold=cfg.accuracy_drop_threshold,
                                 relevance_samples=min(32, cfg.heatmaps) if cfg.heatmaps else 0,
                                 lrp_method=cfg.lrp_method, seed=cfg.seed)
    raw = {m: raw_pixel_model(net, spec) for m, net in torch_models.items() if m in predictors}
    return known_artifact_tests(dict(predictors), raw, x, y, classes, artifacts, art_cfg,
                                clean_preds=predictions.predicted)


@dataclass
class ConceptSection:
    """TCAV evidence on the torch model ``model`` (the served model when the audit holds it, else the source)."""

    model: str
    evidence: ConceptEvidence

    def artifact_tcav(self, artifact: str) -> ArtifactTcav:
        """The artifact concept's TCAV summary for the artifact table."""
        key = f"artifact:{artifact}"
        row = {c: res.results[key] for c, res in self.evidence.per_class.items() if key in res.results}
        return ArtifactTcav(
            model=self.model,
            significant_positive_classes=[c for c, r in row.items()
                                          if r.significant and r.verdict == "positive influence"],
            max_mean_score=max((r.mean for r in row.values()), default=None))

    def as_dict(self) -> dict[str, object]:
        return {"status": "done", "model": self.model, "explains": explained_name(self.model),
                **self.evidence.as_dict()}


def concepts_section(torch_models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, classes: list[str],
                     attributes: Mapping[str, np.ndarray], artifacts: list[ArtifactLike], spec: InputSpec,
                     cfg: AuditConfig) -> ConceptSection | Skipped:
    """TCAV of the tested artifacts and the attribute values per class (``audit.concepts``), CAV
    localisation heatmaps of the localised artifacts."""
    if not torch_models:
        return Skipped("no torch model")
    if not cfg.concepts:
        return Skipped("disabled")
    name = explained_role(torch_models)
    net = raw_pixel_model(torch_models[name], spec)
    pasted, clean_index = {}, {}
    for art in artifacts:
        ci = np.flatnonzero(~carries(x, art))[:200]
        clean_index[art.name] = ci
        pasted[art.name] = art.apply(x[torch.as_tensor(ci)])
    sets = concept_sets(x, dict(attributes), pasted, clean_index, seed=cfg.seed)
    localise = [f"artifact:{a.name}" for a in artifacts if a.localized]
    evidence = concept_evidence(net, x, y, classes, sets, TcavConfig(runs=cfg.tcav_runs, seed=cfg.seed),
                                localise=localise)
    return ConceptSection(name, evidence)


@dataclass(frozen=True)
class InfluenceSection:
    """The influence ranking of the training points for the torch model ``model``."""

    model: str
    artifact: str | None
    report: InfluenceReport

    def as_dict(self) -> dict[str, object]:
        return {"status": "done", "model": self.model, "explains": explained_name(self.model),
                "artifact": self.artifact, **self.report.as_dict()}


def influence_section(torch_models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                      train_x: torch.Tensor | None, train_y: torch.Tensor | None, train_artifact: np.ndarray | None,
                      artifacts: list[ArtifactLike], spec: InputSpec, cfg: AuditConfig) -> InfluenceSection | Skipped:
    """Influence functions on a linear student (paper 003, Sec. 3) of the first torch model; test points
    clean and with the first artifact pasted (the served model when the audit holds it)."""
    if not cfg.influence:
        return Skipped("disabled")
    if train_x is None or train_y is None:
        return Skipped("no training data given (--train-data)")
    if not torch_models:
        return Skipped("no torch model")
    name = explained_role(torch_models)
    icfg = InfluenceConfig(test_samples=cfg.influence_test_samples, seed=cfg.seed)
    inf = LinearStudentInfluence(icfg).fit(torch_models[name], torch.from_numpy(standardise(train_x.numpy(), spec)))
    ti = sample_indices(len(y), icfg.test_samples, cfg.seed + 1)
    xt = x[torch.as_tensor(ti)]
    art = artifacts[0] if artifacts else None
    pasted = None if art is None else torch.from_numpy(standardise(art.apply(xt).numpy(), spec))
    report = inf.report(torch.from_numpy(standardise(xt.numpy(), spec)), y.numpy()[ti], train_y.numpy(),
                        train_artifact, pasted)
    return InfluenceSection(name, None if art is None else art.name, report)
