"""Offline refinement of a third-party model, and export of the bundle (DESIGN.md: ``refinement/``).

The public API is listed in ``__all__`` and loaded lazily (``__getattr__``), so that
``import refinement`` stays cheap; every name lives in the module named beside it.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # embedded data and artifacts
    "CleverHansConfig": "refinement.digits",
    "CleverHansData": "refinement.digits",
    "make_clever_hans": "refinement.digits",
    "ARTIFACTS": "refinement.artifacts",
    "get_artifact": "refinement.artifacts",
    "DecoyConfig": "refinement.decoy",
    "make_decoy": "refinement.decoy",
    "load_labelled": "refinement.datasets",
    "save_npz": "refinement.datasets",
    # models and layers
    "BUILTIN_MODELS": "refinement.models",
    "build_builtin": "refinement.models",
    "load_model": "refinement.models",
    "auto_layers": "refinement.layers",
    "resolve_layers": "refinement.layers",
    # exposure minimisation and baselines (paper 000)
    "EgemConfig": "refinement.egem",
    "ExposureMinimizer": "refinement.egem",
    "ExposureScale": "refinement.egem",
    "PcaExposure": "refinement.egem",
    "METHODS": "refinement.methods",
    "RefineConfig": "refinement.methods",
    "RefinementResult": "refinement.methods",
    "refine_model": "refinement.methods",
    "select_by_slack": "refinement.selection",
    # concepts (paper 001)
    "ClarcConfig": "refinement.clarc",
    "refine_clarc": "refinement.clarc",
    "ConceptHeads": "refinement.concept_heads",
    "watch_concept": "refinement.concept_heads",
    "default_watch_layer": "refinement.concept_heads",
    # explanatory supervision (papers 002, 004)
    "XSConfig": "refinement.xs",
    "train_xs": "refinement.xs",
    "rrr_loss": "refinement.xs",
    "rbr_loss": "refinement.xs",
    "tap_loss": "refinement.xs",
    "Teacher": "refinement.teacher",
    # training, evaluation, export, end-to-end paths
    "TrainConfig": "refinement.training",
    "train_classifier": "refinement.training",
    "BenchmarkConfig": "refinement.evaluation",
    "run_benchmark": "refinement.evaluation",
    "export_checked": "refinement.export",
    "build_bundle": "refinement.pipeline",
    "refine_from_files": "refinement.pipeline",
    "DemoConfig": "refinement.demo",
    "run_demo": "refinement.demo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'refinement' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
