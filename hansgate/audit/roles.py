"""The models an audit compares, by role: ``before`` (the comparison model), ``after`` (the audited bundle),
and ``source`` (the bundle's source model when ``before`` is a second bundle).

Every model is judged by its predictions on raw pixels in the manifest's value range: a bundle through
onnxruntime (the graph normalises itself when ``normalization_in_graph``), a torch model through the
manifest's mean/std first. Torch models are the source model and, when a caller holds it, the refined
module; both take *normalised* inputs, as they did during refinement (``refinement.pipeline`` normalises
the data before refining and bakes ``Normalised`` only into the exported graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from hansgate.audit.inputs import onnx_predictor
from hansgate.bundle import Bundle
from hansgate.manifest import InputSpec, Manifest
from hansgate.nn.normalisation import Normalised
from hansgate.nn.training import predict_logits

__all__ = ["PredictFn", "ModelInfo", "AuditModels", "standardise", "raw_pixel_model", "torch_predictor",
           "audit_models"]

PredictFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ModelInfo:
    """How the report names a model: label, runtime, identity (and the weights file of a torch model)."""

    label: str
    kind: Literal["onnx", "torch"]
    sha256: str
    weights: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {"label": self.label, "kind": self.kind, "sha256": self.sha256}
        if self.kind == "torch":
            out["weights"] = self.weights
        return out


@dataclass
class AuditModels:
    """``predictors`` (raw pixels -> logits) for ``before``/``after``; ``torch`` modules (normalised
    inputs) for attributions, keyed by role; ``info`` for every role that appears in the report."""

    predictors: dict[str, PredictFn]
    torch: dict[str, nn.Module] = field(default_factory=dict)
    info: dict[str, ModelInfo] = field(default_factory=dict)


def _identity(spec: InputSpec) -> bool:
    return all(m == 0 for m in spec.mean) and all(s == 1 for s in spec.std)


def standardise(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``(x - mean) / std`` per channel: what a torch model of the bundle takes (float32)."""
    x = np.asarray(x, dtype=np.float32)
    if _identity(spec):
        return x
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return ((x - mean) / std).astype(np.float32)


def raw_pixel_model(model: nn.Module, spec: InputSpec) -> nn.Module:
    """``model`` taking raw pixels: ``Normalised(model, mean, std)``, or ``model`` itself for mean 0 / std 1."""
    if _identity(spec):
        return model
    return Normalised(model, spec.mean, spec.std).eval()


def torch_predictor(model: nn.Module, spec: InputSpec) -> PredictFn:
    """Raw pixels ``[N, C, H, W]`` -> logits of a torch model that takes normalised inputs."""

    def predict(x: np.ndarray) -> np.ndarray:
        return predict_logits(model, torch.from_numpy(standardise(x, spec))).numpy()

    return predict


def _source_info(manifest: Manifest, weights: str | None) -> ModelInfo:
    return ModelInfo(f"original ({manifest.source_model.spec})", "torch", manifest.source_model.sha256, weights)


def audit_models(bundle: Bundle, before_bundle: Bundle | None = None, source_model: nn.Module | None = None,
                 source_weights: str | None = None, after_torch: nn.Module | None = None) -> AuditModels:
    """The roles of an audit: ``before`` is a second bundle if given, else the source model if loaded."""
    manifest = bundle.manifest
    models = AuditModels(predictors={})
    if before_bundle is not None:
        models.predictors["before"] = onnx_predictor(before_bundle)
        models.info["before"] = ModelInfo(
            f"bundle {before_bundle.path.name} ({before_bundle.manifest.method.name})", "onnx",
            before_bundle.manifest.graph.sha256)
    elif source_model is not None:
        models.predictors["before"] = torch_predictor(source_model, manifest.input)
        models.info["before"] = _source_info(manifest, source_weights)
    models.predictors["after"] = onnx_predictor(bundle)
    models.info["after"] = ModelInfo(f"refined ({manifest.method.name})", "onnx", manifest.graph.sha256)
    if source_model is not None:
        models.torch["before" if before_bundle is None else "source"] = source_model
    if after_torch is not None:
        models.torch["after"] = after_torch
    if "source" in models.torch:
        models.info["source"] = _source_info(manifest, source_weights)
    return models
