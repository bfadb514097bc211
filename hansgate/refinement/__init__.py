"""Offline refinement of a third-party model, and export of the bundle (DESIGN.md: ``refinement/``).

The public API is listed in ``__all__`` and loaded lazily (``__getattr__``), so that
``import hansgate.refinement`` stays cheap; every name lives in the module named beside it.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # exposure minimisation and baselines (paper 000)
    "EgemConfig": "hansgate.refinement.egem",
    "ExposureMinimizer": "hansgate.refinement.egem",
    "ExposureScale": "hansgate.refinement.egem",
    "PcaExposure": "hansgate.refinement.egem",
    "METHODS": "hansgate.refinement.methods",
    "RefineConfig": "hansgate.refinement.methods",
    "RefinementResult": "hansgate.refinement.methods",
    "refine_model": "hansgate.refinement.methods",
    "select_by_slack": "hansgate.refinement.selection",
    "select_best": "hansgate.refinement.selection",
    "Selection": "hansgate.refinement.selection",
    "SlackSelection": "hansgate.refinement.selection",
    "RuleSelection": "hansgate.refinement.selection",
    # one registry of methods, one pipeline from files to bundle
    "register": "hansgate.refinement.registry",
    "get_refiner": "hansgate.refinement.registry",
    "Refiner": "hansgate.refinement.refiners",
    "RefinerConfig": "hansgate.refinement.refiners",
    "RefineData": "hansgate.refinement.refiners",
    "DataOptions": "hansgate.refinement.pipeline",
    "load_inputs": "hansgate.refinement.pipeline",
    "refine": "hansgate.refinement.pipeline",
    # concepts (paper 001)
    "ClarcConfig": "hansgate.refinement.clarc",
    "refine_clarc": "hansgate.refinement.clarc",
    "ConceptHeads": "hansgate.refinement.concept_heads",
    "watch_concept": "hansgate.refinement.concept_heads",
    "default_watch_layer": "hansgate.refinement.concept_heads",
    # explanatory supervision (papers 002, 004)
    "XSConfig": "hansgate.refinement.xs",
    "train_xs": "hansgate.refinement.xs",
    "rrr_loss": "hansgate.refinement.xs",
    "rbr_loss": "hansgate.refinement.xs",
    "tap_loss": "hansgate.refinement.xs",
    "Teacher": "hansgate.refinement.teacher",
    # training, evaluation, export, end-to-end paths
    "BenchmarkConfig": "hansgate.refinement.evaluation",
    "run_benchmark": "hansgate.refinement.evaluation",
    "build_bundle": "hansgate.refinement.pipeline",
    "refine_from_files": "hansgate.refinement.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hansgate.refinement' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
