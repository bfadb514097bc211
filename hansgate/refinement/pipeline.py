"""From a model and verified data to a bundle: the path ``hansgate refine`` and the demo share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import hansgate
from hansgate.bundle import Bundle, sha256_bytes, write_bundle
from hansgate.errors import DataError
from hansgate.files import to_jsonable
from hansgate.manifest import (
    ConceptSpec,
    Evaluation,
    GraphOutput,
    GraphSpec,
    InputSpec,
    Manifest,
    MethodSpec,
    SourceModel,
    SubgroupAttribute,
)
from hansgate.nn.export import OPSET, export_checked
from hansgate.nn.normalisation import Normalised
from hansgate.nn.training import predict_logits
from hansgate.refinement.methods import RefineConfig, RefinementResult

__all__ = ["verified_subset", "per_class_subset", "bundle_graph", "build_bundle", "refine_from_files"]


def verified_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples the model predicts correctly (paper 000, Supp. F.1: the user-verified set)."""
    keep = predict_logits(model, x).argmax(1) == y
    if int(keep.sum()) < 5:
        raise DataError(f"only {int(keep.sum())} of {len(y)} refinement samples are predicted correctly; "
                        "refinement needs verified samples the model gets right")
    return x[keep], y[keep]


def per_class_subset(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``per_class`` samples of each class, drawn under ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    idx = []
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        idx.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    order = torch.cat(idx).sort().values
    return x[order], y[order]


def bundle_graph(model: nn.Module, concepts: Any | None = None) -> tuple[nn.Module, list[str]]:
    """The module to export and its output names; concept heads are added by ``concepts`` when given."""
    if concepts is None:
        return model.eval(), ["logits"]
    return concepts.graph(model), ["logits", "concept_scores", "concept_sensitivity"]


def build_bundle(
    out: str | Path,
    result: RefinementResult,
    *,
    x_check: torch.Tensor,
    classes: list[str],
    input_spec: InputSpec,
    source: SourceModel,
    evaluation: Evaluation | None = None,
    subgroups: list[SubgroupAttribute] | None = None,
    concepts: Any | None = None,
    concept_specs: list[ConceptSpec] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Export ``result.model``, check it against torch on ``x_check`` and write the bundle atomically."""
    graph, names = bundle_graph(result.model, concepts)
    onnx_bytes, diff = export_checked(graph, x_check, names)
    if concepts is not None:  # the heads' sensitivity must match autograd (refinement.concept_heads)
        concepts.check(onnx_bytes, result.model, x_check)
        concept_specs = concept_specs if concept_specs is not None else concepts.specs()
    k, m = len(classes), len(concept_specs or [])
    shapes: dict[str, list[int | None]] = {"logits": [None, k], "concept_scores": [None, m],
                                           "concept_sensitivity": [None, m, k]}
    manifest = Manifest(
        hansgate_version=hansgate.__version__,
        classes=classes,
        input=input_spec,
        source_model=source,
        method=MethodSpec(name=result.method, layers=result.layers, hyperparameters=to_jsonable(result.hyperparameters)
                          | {"selection": to_jsonable(result.selection.as_dict())}, seed=None),
        evaluation=evaluation,
        concepts=concept_specs or [],
        subgroups=subgroups or [],
        graph=GraphSpec(sha256=sha256_bytes(onnx_bytes), opset=OPSET,
                        outputs=[GraphOutput(name=n, shape=shapes[n]) for n in names], max_abs_logit_diff=diff),
    )
    return write_bundle(out, onnx_bytes, manifest, overwrite=overwrite)


def refine_from_files(
    *,
    model_spec: str,
    weights: str | None,
    data: str,
    out: str | Path,
    config: RefineConfig,
    classes: list[str] | None = None,
    test_data: str | None = None,
    poisoned_data: str | None = None,
    image_size: tuple[int, int] = (28, 28),
    channels: int = 1,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Bundle, dict[str, Any]]:
    """``hansgate refine``: load model and data safely, refine, export, write the bundle atomically.

    With ``mean``/``std`` the data are raw pixels in [0, 1]; refinement runs on normalised
    inputs and the exported graph applies the normalisation itself.
    """
    from hansgate.data.datasets import load_labelled
    from hansgate.nn.models import load_model, source_sha256
    from hansgate.refinement.methods import refine_model

    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"output {out} exists; pass --overwrite to replace it")
    ds = load_labelled(data, channels=channels, size=image_size)
    names = classes or ds.classes
    if len(names) < 2 or int(ds.y.max()) >= len(names):
        raise DataError(f"labels go up to {int(ds.y.max())} but {len(names)} class name(s) were given")
    c, h, w = ds.x.shape[1:]
    mean = mean or [0.0] * c
    std = std or [1.0] * c
    if len(mean) != c or len(std) != c or any(s <= 0 for s in std):
        raise DataError(f"--mean/--std need {c} value(s) each (std > 0)")
    norm = Normalised(torch.nn.Identity(), mean, std)

    def prep(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return norm(x)

    model = load_model(model_spec, weights, num_classes=len(names), in_channels=c, image_size=h)
    x, y = verified_subset(model, prep(ds.x), ds.y)
    if (k_out := predict_logits(model, x[:2]).shape[1]) != len(names):
        raise DataError(f"the model has {k_out} outputs but the data have {len(names)} classes")
    result = refine_model(model, x, y, config, progress=progress)

    def scores(m: nn.Module) -> dict[str, float]:
        from hansgate.nn.training import accuracy

        out_scores = {"verified_acc": accuracy(m, x, y)}
        for key, path in (("clean_acc", test_data), ("poisoned_acc", poisoned_data)):
            if path:
                extra = load_labelled(path, channels=channels, size=image_size)
                out_scores[key] = accuracy(m, prep(extra.x), extra.y)
        return out_scores

    evaluation = Evaluation(data=f"verified: {data}; test: {test_data}; poisoned: {poisoned_data}",
                            before=scores(model), after=scores(result.model))
    baked = any(v != 0 for v in mean) or any(v != 1 for v in std)
    if baked:
        result.model = Normalised(result.model, mean, std).eval()
    source_hash = source_sha256(model_spec, weights, model)
    bundle = build_bundle(
        out, result,
        x_check=(ds.x if baked else x)[:256],
        classes=names,
        input_spec=InputSpec(channels=c, height=h, width=w, mean=mean, std=std, normalization_in_graph=baked,
                             color_mode="L" if c == 1 else "RGB"),
        source=SourceModel(spec=model_spec, sha256=source_hash, weights=str(weights) if weights else None),
        evaluation=evaluation,
        overwrite=overwrite,
    )
    return bundle, {"before": evaluation.before, "after": evaluation.after, "n_verified": len(y),
                    "n_data": len(ds.y), "method": result.method, "hyperparameters": result.hyperparameters}
