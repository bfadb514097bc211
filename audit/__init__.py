"""Measurements and the compliance report (DESIGN.md: ``audit/``).

Importing ``audit`` does not import torch: the service uses the torch-free parts
(``audit.compliance``, ``audit.subgroups``) on its hot path. Torch-using names are
re-exported lazily (``__getattr__``) and load their module on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    # torch-free
    "SubgroupAuditor",
    "recall_by_group",
    "read_attributes",
    "write_attributes",
    # torch (lazy)
    "ATTRIBUTION_METHODS",
    "AttributionConfig",
    "attribute",
    "relevance_share_in_mask",
    "verify_by_relevance",
    "ArtifactTestConfig",
    "PatchArtifact",
    "known_artifact_tests",
    "InfluenceConfig",
    "LinearStudentInfluence",
    "AuditConfig",
    "AuditInputs",
    "run_audit",
    "write_report",
]

_LAZY = {
    "SubgroupAuditor": "audit.subgroups",
    "recall_by_group": "audit.subgroups",
    "read_attributes": "audit.inputs",
    "write_attributes": "audit.inputs",
    "ATTRIBUTION_METHODS": "audit.attributions",
    "AttributionConfig": "audit.attributions",
    "attribute": "audit.attributions",
    "relevance_share_in_mask": "audit.attributions",
    "verify_by_relevance": "audit.attributions",
    "ArtifactTestConfig": "audit.artifact_tests",
    "PatchArtifact": "audit.artifact_tests",
    "known_artifact_tests": "audit.artifact_tests",
    "InfluenceConfig": "audit.influence",
    "LinearStudentInfluence": "audit.influence",
    "AuditConfig": "audit.runner",
    "AuditInputs": "audit.runner",
    "run_audit": "audit.runner",
    "write_report": "audit.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'audit' has no attribute {name!r}")
