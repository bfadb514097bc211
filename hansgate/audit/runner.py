"""One audit, end to end: inputs -> every measurement -> ``report.json`` / ``report.html`` / ``report.pdf``.

Models. The audited bundle runs through onnxruntime (``after``). The comparison model
(``before``) is, in order of preference, a second bundle (``before_bundle``), or the
bundle's source model (``manifest.source_model``, weights found next to the bundle or
given explicitly, loaded without unpickling and checked against the manifest's sha256).

Attributions need a torch model. The bundle is an ONNX graph, and hansgate does not
rebuild torch modules from ONNX, so from the command line heatmaps, relevance shares,
concept evidence and influence are computed on the **source model** (the model whose
shortcut the audit looks for); the refined model's side is covered by its predictions
(subgroups, flip rates, accuracy drops). Callers that hold the refined torch model (the
demo) pass it as ``after_torch`` and get its heatmaps and relevance shares too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hansgate.audit.compliance import ComplianceThresholds

__all__ = ["AuditConfig", "AuditInputs", "run_audit", "audit_command"]


class AuditConfig(BaseModel):
    """Everything an audit can be told; defaults are the report's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recall_margin: float = Field(0.10, gt=0, lt=1, description="flag subgroups this far below the overall figure")
    min_samples: int = Field(30, ge=1, description="no subgroup flag from fewer positives")
    z: float = Field(1.96, gt=0, description="normal quantile of the Wilson intervals")
    artifacts: tuple[str, ...] = ("corner", "frame", "stamp", "dot")
    patches: tuple[str, ...] = ()
    flip_threshold: float = Field(0.10, gt=0, le=1)
    accuracy_drop_threshold: float = Field(0.05, gt=0, le=1)
    heatmaps: int = Field(32, ge=0, description="samples with LRP heatmaps")
    lrp_method: str = Field("lrp-epsilon-zplus-box", description="composite of heatmaps and relevance shares")
    accept_share: float = Field(0.75, gt=0, le=1, description="paper 000 Supp. F.1 verification rule")
    concepts: bool = True
    tcav_runs: int = Field(10, ge=2)
    influence: bool = True
    influence_test_samples: int = Field(30, ge=1)
    max_samples: int | None = Field(None, ge=10, description="audit a seeded subset of the data")
    pdf: bool = True
    seed: int = 0


@dataclass
class AuditInputs:
    """Loaded inputs. ``x`` float ``[N, C, H, W]`` in the manifest's value range (torch tensor), ``y`` ``[N]``."""

    bundle: Any
    x: Any
    y: Any
    classes: list[str]
    attributes: dict[str, np.ndarray]
    data_path: str
    attributes_path: str
    before_bundle: Any = None
    source_model: Any = None
    source_weights: str | None = None
    after_torch: Any = None
    train_x: Any = None
    train_y: Any = None
    train_artifact: np.ndarray | None = None
    region_mask: Any = None
    region_mask_name: str | None = None
    notes: list[str] = field(default_factory=list)


def _torch_predictor(model: Any, manifest: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from hansgate.audit.inputs import normalize

    def predict(x: np.ndarray) -> np.ndarray:
        xn = torch.from_numpy(normalize(np.asarray(x, dtype=np.float32), manifest))
        from hansgate.nn.training import predict_logits

        return predict_logits(model, xn).numpy()

    return predict


def _sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def run_audit(inputs: AuditInputs, config: AuditConfig | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every measurement. Returns ``(report, figure_data)``: the JSON-able report (without figures)
    and the arrays the figures are drawn from (``audit.report`` renders and files them)."""
    import torch

    import hansgate
    from hansgate.audit.artifact_tests import (
        ArtifactTestConfig,
        known_artifact_tests,
        resolve_artifacts,
    )
    from hansgate.audit.attributions import (
        ATTRIBUTION_METHODS,
        AttributionConfig,
        attribute,
        relevance_share_in_mask,
    )
    from hansgate.audit.inputs import normalize, onnx_predictor
    from hansgate.audit.subgroups import SubgroupAuditor

    cfg = config or AuditConfig()
    say = progress or (lambda s: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    manifest = inputs.bundle.manifest
    classes = inputs.classes
    x, y = inputs.x, inputs.y
    y_np = y.numpy()

    # ---- models
    predictors: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    torch_models: dict[str, Any] = {}
    models_info: dict[str, Any] = {}
    if inputs.before_bundle is not None:
        predictors["before"] = onnx_predictor(inputs.before_bundle)
        models_info["before"] = {"label": f"bundle {inputs.before_bundle.path.name} "
                                          f"({inputs.before_bundle.manifest.method.name})",
                                 "kind": "onnx", "sha256": inputs.before_bundle.manifest.graph.sha256}
    elif inputs.source_model is not None:
        predictors["before"] = _torch_predictor(inputs.source_model, manifest)
        models_info["before"] = {"label": f"original ({manifest.source_model.spec})", "kind": "torch",
                                 "sha256": manifest.source_model.sha256, "weights": inputs.source_weights}
    predictors["after"] = onnx_predictor(inputs.bundle)
    models_info["after"] = {"label": f"refined ({manifest.method.name})", "kind": "onnx",
                            "sha256": manifest.graph.sha256}
    if inputs.source_model is not None:
        torch_models["before" if inputs.before_bundle is None else "source"] = inputs.source_model
    if inputs.after_torch is not None:
        torch_models["after"] = inputs.after_torch
    if "source" in torch_models:
        models_info["source"] = {"label": f"original ({manifest.source_model.spec})", "kind": "torch",
                                 "sha256": manifest.source_model.sha256, "weights": inputs.source_weights}

    # ---- predictions and subgroup metrics
    t0 = time.perf_counter()
    say("predictions")
    logits = {m: p(x.numpy()) for m, p in predictors.items()}
    preds = {m: v.argmax(1) for m, v in logits.items()}
    thresholds = ComplianceThresholds(recall_margin=cfg.recall_margin, min_samples=cfg.min_samples, z=cfg.z)
    say("subgroups")
    sub = SubgroupAuditor(classes, thresholds).fit(y_np, preds, inputs.attributes).result_
    timings["subgroups"] = time.perf_counter() - t0

    # ---- the headline: groups flagged for "before" and what refinement did to them
    headline = []
    if "before" in sub["models"]:
        for attr, groups in sub["models"]["before"]["attributes"].items():
            for value, g in groups.items():
                low_classes = [c for c, r in g["classes"].items() if "recall_below_overall" in r["flags"]]
                if g["flagged"] or low_classes:
                    after = sub["models"]["after"]["attributes"][attr][value]
                    headline.append({
                        "attribute": attr, "value": value, "n": g["n"],
                        "accuracy_before": g["accuracy"]["value"], "accuracy_after": after["accuracy"]["value"],
                        "macro_recall_before": g["macro_recall"], "macro_recall_after": after["macro_recall"],
                        "classes_below_overall_before": low_classes,
                        "classes_below_overall_after": [c for c, r in after["classes"].items()
                                                        if "recall_below_overall" in r["flags"]],
                        "raised": bool(after["macro_recall"] is not None and g["macro_recall"] is not None
                                       and after["macro_recall"] > g["macro_recall"])})

    # ---- attributions and the verification rule
    t0 = time.perf_counter()
    attributions: dict[str, Any] = {"status": "skipped", "reason": "no torch model (source weights not found)"}
    figure_data: dict[str, Any] = {"subgroups": sub, "models_info": models_info}
    attr_cfg = AttributionConfig(value_range=tuple(manifest.input.value_range), seed=cfg.seed)
    if torch_models and cfg.heatmaps > 0:
        say("attributions")
        idx = _sample_indices(len(y), cfg.heatmaps, cfg.seed)
        xs = torch.from_numpy(normalize(x[torch.as_tensor(idx)].numpy(), manifest))
        samples: list[dict[str, Any]] = [{"index": int(i), "label": classes[int(y[i])],
                    "predicted": {m: classes[int(preds[m][i])] for m in preds}} for i in idx]
        heat: dict[str, np.ndarray] = {}
        for m, net in torch_models.items():
            with torch.no_grad():
                target = net(xs).argmax(1)
            rel = attribute(net, xs, target, cfg.lrp_method, attr_cfg)
            heat[m] = rel.sum(1).numpy()
            if inputs.region_mask is not None:
                share = relevance_share_in_mask(rel, inputs.region_mask)
                for s, v in zip(samples, share.tolist()):
                    s.setdefault("region_share", {})[m] = v
                    s.setdefault("verified", {})[m] = bool(v >= cfg.accept_share)
        attributions = {"status": "done", "models": list(torch_models), "composite": cfg.lrp_method,
                        "explained": "logit of the class the model predicts", "n": int(len(idx)),
                        "samples": samples, "accept_share": cfg.accept_share,
                        "region_mask": inputs.region_mask_name}
        if inputs.region_mask is not None:
            attributions["verified_share"] = {
                m: float(np.mean([s["verified"][m] for s in samples])) for m in torch_models}
            attributions["mean_region_share"] = {
                m: float(np.mean([s["region_share"][m] for s in samples])) for m in torch_models}
        # every method on a few samples of the first torch model (paper 003, Fig. 2A)
        first = next(iter(torch_models))
        few = xs[:4]
        with torch.no_grad():
            few_t = torch_models[first](few).argmax(1)
        methods = {meth: attribute(torch_models[first], few, few_t, meth, attr_cfg).sum(1).numpy()
                   for meth in ATTRIBUTION_METHODS}
        attributions["methods_model"] = first
        attributions["methods"] = list(ATTRIBUTION_METHODS)
        figure_data["heatmaps"] = {"images": x[torch.as_tensor(idx[:8])][:, 0].numpy(),
                                   "rows": {m: h[:8] for m, h in heat.items()}, "samples": samples[:8]}
        figure_data["methods"] = {"images": x[torch.as_tensor(idx[:4])][:, 0].numpy(), "maps": methods}
    timings["attributions"] = time.perf_counter() - t0

    # ---- known-artifact tests
    t0 = time.perf_counter()
    say("artifact tests")
    artifacts = resolve_artifacts(list(cfg.artifacts), list(cfg.patches))
    art_cfg = ArtifactTestConfig(flip_threshold=cfg.flip_threshold, accuracy_drop_threshold=cfg.accuracy_drop_threshold,
                                 relevance_samples=min(32, cfg.heatmaps) if cfg.heatmaps else 0,
                                 lrp_method=cfg.lrp_method, seed=cfg.seed)
    # artifact tests work in raw pixel space (artifacts are pasted on raw images); predictors normalise
    torch_norm = {m: _Normalised(net, manifest) for m, net in torch_models.items() if m in predictors}
    arts = known_artifact_tests(predictors, torch_norm, x, y, classes, artifacts, art_cfg, clean_preds=preds)
    figure_data["artifact_heatmaps"] = arts.pop("heatmaps")
    timings["artifact_tests"] = time.perf_counter() - t0

    # ---- concept evidence (source model)
    t0 = time.perf_counter()
    concepts: dict[str, Any] = {"status": "skipped", "reason": "no torch model" if not torch_models else "disabled"}
    concept_model_name = next(iter(torch_models), None)
    if cfg.concepts and concept_model_name is not None:
        say("concepts")
        from hansgate.audit.artifact_tests import carries
        from hansgate.audit.concepts import concept_evidence, concept_sets
        from hansgate.audit.tcav import TcavConfig

        net = _Normalised(torch_models[concept_model_name], manifest)
        pasted, clean_index = {}, {}
        for art in artifacts:
            ci = np.flatnonzero(~carries(x, art))[:200]
            clean_index[art.name] = ci
            pasted[art.name] = art.apply(x[torch.as_tensor(ci)])
        sets = concept_sets(x, inputs.attributes, pasted, clean_index, seed=cfg.seed)
        localise = [f"artifact:{a.name}" for a in artifacts if a.localized]
        ev = concept_evidence(net, x, y, classes, sets, TcavConfig(runs=cfg.tcav_runs, seed=cfg.seed),
                              localise=localise)
        figure_data["localisation"] = ev.pop("localisation")
        concepts = {"status": "done", "model": concept_model_name, **ev}
        # TCAV of each artifact concept, per model with a torch module, for the artifact table
        for art in artifacts:
            key = f"artifact:{art.name}"
            row = {c: res["results"][key] for c, res in ev["per_class"].items() if key in res["results"]}
            arts["artifacts"][art.name]["tcav"] = {
                "model": concept_model_name,
                "significant_positive_classes": [c for c, r in row.items()
                                                 if r["significant"] and r["verdict"] == "positive influence"],
                "max_mean_score": max((r["mean"] for r in row.values()), default=None)}
    timings["concepts"] = time.perf_counter() - t0

    # ---- influence
    t0 = time.perf_counter()
    influence: dict[str, Any] = {"status": "skipped", "reason": "no training data given (--train-data)"}
    if cfg.influence and inputs.train_x is not None and concept_model_name is not None:
        say("influence")
        from hansgate.audit.influence import InfluenceConfig, LinearStudentInfluence

        net = torch_models[concept_model_name]
        icfg = InfluenceConfig(test_samples=cfg.influence_test_samples, seed=cfg.seed)
        xtr = torch.from_numpy(normalize(inputs.train_x.numpy(), manifest))
        inf = LinearStudentInfluence(icfg).fit(net, xtr)
        ti = _sample_indices(len(y), icfg.test_samples, cfg.seed + 1)
        xt = x[torch.as_tensor(ti)]
        trained_artifact = artifacts[0] if artifacts else None
        pasted_t = None
        if trained_artifact is not None:
            pasted_t = torch.from_numpy(normalize(trained_artifact.apply(xt).numpy(), manifest))
        influence = {"status": "done", "model": concept_model_name,
                     "artifact": trained_artifact.name if trained_artifact is not None else None,
                     **inf.report(torch.from_numpy(normalize(xt.numpy(), manifest)), y_np[ti],
                                  inputs.train_y.numpy(), inputs.train_artifact, pasted_t)}
    timings["influence"] = time.perf_counter() - t0

    # ---- the bundle's own concept heads, counted exactly as the gateway's compliance snapshot does
    bundle_tcav: dict[str, Any] = {"status": "skipped", "reason": "the bundle watches no concepts"}
    if manifest.concepts:
        from hansgate.audit.compliance import tcav_table
        from hansgate.audit.inputs import tcav_sign_counts

        names = [c.name for c in manifest.concepts]
        lg, sens = onnx_predictor(inputs.bundle, outputs=("logits", "concept_sensitivity"))(x.numpy())
        tcav_positive, tcav_samples = tcav_sign_counts(lg, sens, names, classes)
        baseline = {(c.name, k): v for c in manifest.concepts for k, v in c.baseline_tcav.items()}
        rows = tcav_table(tcav_positive, tcav_samples, baseline, thresholds)
        bundle_tcav = {"status": "done", "concepts": names, "rows": [r.as_dict() for r in rows],
                       "flags": [r.as_dict() for r in rows if r.flags]}

    acc = {m: {"value": float((p == y_np).mean()), "n": int(len(y_np))} for m, p in preds.items()}
    report: dict[str, Any] = {
        "schema": "hansgate.audit/1",
        "hansgate_version": hansgate.__version__,
        "inputs": {"bundle": str(inputs.bundle.path), "bundle_sha256": manifest.graph.sha256,
                   "bundle_method": manifest.method.name, "data": inputs.data_path,
                   "attributes_file": inputs.attributes_path, "n_samples": int(len(y_np)), "classes": classes,
                   "attributes": {a: {str(v): int((vals == v).sum()) for v in sorted(set(vals.tolist()))}
                                  for a, vals in inputs.attributes.items()},
                   "train_data": inputs.train_x is not None, "notes": inputs.notes},
        "config": cfg.model_dump(),
        "models": models_info,
        "accuracy": acc,
        "headline": headline,
        "subgroups": sub,
        "attributions": attributions,
        "artifact_tests": arts,
        "concepts": concepts,
        "bundle_tcav": bundle_tcav,
        "influence": influence,
        "limitations": LIMITATIONS,
    }
    timings["total"] = time.perf_counter() - t_start
    report["timing_seconds"] = timings
    return report, figure_data


def _Normalised(model: Any, manifest: Any) -> Any:  # noqa: N802 - reads like the wrapper it returns
    """``model`` taking raw pixels: a new module applying the manifest's normalisation first
    (``model`` itself when the graph normalises or the normalisation is the identity)."""
    import torch
    from torch import nn

    spec = manifest.input
    if spec.normalization_in_graph or (all(m == 0 for m in spec.mean) and all(s == 1 for s in spec.std)):
        return model

    class Normalised(nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner((t - self.mean) / self.std)

    return Normalised().eval()


LIMITATIONS = [
    "An audit only finds the shortcuts it tests for: attributions, concept rankings and influence rankings "
    "revealed a spurious signal only when it was known and tested explicitly (Adebayo et al., paper 003). "
    "Artifacts that are not in the tested list, and attributes that are not declared, stay invisible here.",
    "Subgroup figures describe the audited data set only; small subgroups have wide intervals and are not flagged "
    "below the minimum sample count.",
    "Heatmaps, relevance shares, concept evidence and influence are computed on torch models; from the command "
    "line that is the source model only (the refined bundle is an ONNX graph and is judged by its predictions).",
    "The influence ranking uses a linear student of the network on randomly projected embeddings; its fidelity "
    "is reported and bounds how far the ranking speaks for the network itself.",
]


def audit_command(args: Any) -> str:
    """``hansgate audit``: load and validate every input, run, and write the report atomically."""
    from hansgate.audit.report import write_report

    inputs = load_inputs(args)
    cfg = AuditConfig(
        recall_margin=args.gap_threshold, min_samples=args.min_samples, artifacts=tuple(args.artifacts),
        patches=tuple(args.patch or ()), heatmaps=args.heatmaps, accept_share=args.accept_share,
        concepts=not args.no_concepts, influence=not args.no_influence, max_samples=args.max_samples,
        pdf=not args.no_pdf, seed=args.seed, flip_threshold=args.flip_threshold,
        accuracy_drop_threshold=args.accuracy_drop_threshold)
    from hansgate.audit.report import check_pdf_renderer

    if cfg.pdf:
        check_pdf_renderer()
    from hansgate.audit.artifact_tests import resolve_artifacts

    resolve_artifacts(list(cfg.artifacts), list(cfg.patches))  # fail on a bad patch before any work
    start = time.perf_counter()
    report, figs = run_audit(inputs, cfg, progress=None if args.quiet else (lambda s: print(f"audit: {s}")))
    paths = write_report(args.out, report, figs, pdf=cfg.pdf, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    return f"audit written to {paths['html'].parent} ({seconds:.0f} s): " + ", ".join(p.name for p in paths.values())


def load_inputs(args: Any) -> AuditInputs:
    """Read every input named on the command line; the first problem raises one ``HansgateError``."""
    import torch

    from hansgate.audit.inputs import (
        load_source_model,
        read_attributes,
        source_weights_path,
    )
    from hansgate.bundle import load_bundle
    from hansgate.data.datasets import load_labelled
    from hansgate.errors import DataError

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    data = load_labelled(args.data)
    if tuple(data.x.shape[1:]) != tuple(m.input.shape):
        raise DataError(f"{args.data}: samples have shape {tuple(data.x.shape[1:])}, the bundle expects "
                        f"{tuple(m.input.shape)}")
    if len(data.classes) != len(m.classes) or int(data.y.max()) >= len(m.classes):
        raise DataError(f"{args.data}: {len(data.classes)} classes, the bundle has {len(m.classes)}")
    attributes = read_attributes(args.attributes, len(data.y), m)
    x, y = data.x, data.y
    notes: list[str] = []
    if args.max_samples is not None and args.max_samples < len(y):
        idx = _sample_indices(len(y), args.max_samples, args.seed)
        x, y = x[torch.as_tensor(idx)], y[torch.as_tensor(idx)]
        attributes = {a: v[idx] for a, v in attributes.items()}
        notes.append(f"seeded subset of {len(idx)} samples")
    before_bundle = load_bundle(args.before) if args.before else None
    source_model, weights = None, None
    if not args.no_source:
        weights = source_weights_path(bundle, args.source_weights)
        if weights is not None:
            source_model = load_source_model(bundle, weights)
        else:
            notes.append("source model weights not found next to the bundle: no attributions")
    train_x = train_y = train_art = None
    if args.train_data:
        tr = load_labelled(args.train_data)
        train_x, train_y = tr.x, tr.y
        with np.load(args.train_data, allow_pickle=False) as z:
            if "artifact" in z.files:
                train_art = np.asarray(z["artifact"]).astype(bool)
                if len(train_art) != len(train_y):
                    raise DataError(f"{args.train_data}: 'artifact' has {len(train_art)} entries, 'y' {len(train_y)}")
        if train_art is None and args.artifacts:
            from hansgate.audit.artifact_tests import carries, resolve_artifacts

            train_art = carries(train_x, resolve_artifacts([args.artifacts[0]])[0])
    region = region_name = None
    if args.region_mask:
        p = Path(args.region_mask)
        if not p.is_file():
            raise DataError(f"region mask not found: {p}")
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"cannot read region mask {p}: {exc}") from exc
        if arr.shape != tuple(m.input.shape[1:]):
            raise DataError(f"region mask {p} has shape {arr.shape}, images are {tuple(m.input.shape[1:])}")
        region, region_name = torch.from_numpy((arr > 0).astype(np.float32)), p.name
    return AuditInputs(bundle=bundle, x=x, y=y, classes=list(m.classes), attributes=attributes,
                       data_path=str(args.data), attributes_path=str(args.attributes), before_bundle=before_bundle,
                       source_model=source_model, source_weights=str(weights) if weights else None,
                       train_x=train_x, train_y=train_y, train_artifact=train_art, region_mask=region,
                       region_mask_name=region_name, notes=notes)
