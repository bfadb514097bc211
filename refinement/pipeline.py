"""From a model and verified data to a bundle: the path ``hansgate refine`` and the demo share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import hansgate
from hansgate.bundle import Bundle, sha256_bytes, write_bundle
from hansgate.errors import DataError
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
from refinement.export import OPSET, export_checked
from refinement.methods import RefinementResult
from refinement.training import predict_logits

__all__ = ["verified_subset", "per_class_subset", "bundle_graph", "build_bundle"]


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
        method=MethodSpec(name=result.method, layers=result.layers, hyperparameters=_jsonable(result.hyperparameters)
                          | {"selection": _jsonable(result.selection.as_dict())}, seed=None),
        evaluation=evaluation,
        concepts=concept_specs or [],
        subgroups=subgroups or [],
        graph=GraphSpec(sha256=sha256_bytes(onnx_bytes), opset=OPSET,
                        outputs=[GraphOutput(name=n, shape=shapes[n]) for n in names], max_abs_logit_diff=diff),
    )
    return write_bundle(out, onnx_bytes, manifest, overwrite=overwrite)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types for the manifest (tensors and numpy scalars become floats/lists)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
