"""Measurements and the compliance report (DESIGN.md: ``audit/``).

Importing ``hansgate.audit`` does not import torch: the service uses the torch-free parts
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
    "AuditReport",
    "AuditSources",
    "load_inputs",
    "run_audit",
    "write_report",
    "fairness_section",
]

_LAZY = {
    "SubgroupAuditor": "hansgate.audit.subgroups",
    "recall_by_group": "hansgate.audit.subgroups",
    "read_attributes": "hansgate.audit.inputs",
    "write_attributes": "hansgate.audit.inputs",
    "ATTRIBUTION_METHODS": "hansgate.audit.attributions",
    "AttributionConfig": "hansgate.audit.attributions",
    "attribute": "hansgate.audit.attributions",
    "relevance_share_in_mask": "hansgate.audit.attributions",
    "verify_by_relevance": "hansgate.audit.attributions",
    "ArtifactTestConfig": "hansgate.audit.artifact_tests",
    "PatchArtifact": "hansgate.audit.artifact_tests",
    "known_artifact_tests": "hansgate.audit.artifact_tests",
    "InfluenceConfig": "hansgate.audit.influence",
    "LinearStudentInfluence": "hansgate.audit.influence",
    "AuditConfig": "hansgate.audit.config",
    "AuditInputs": "hansgate.audit.runner",
    "AuditReport": "hansgate.audit.runner",
    "AuditSources": "hansgate.audit.loading",
    "load_inputs": "hansgate.audit.loading",
    "fairness_section": "hansgate.audit.fairness",
    "run_audit": "hansgate.audit.runner",
    "write_report": "hansgate.audit.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hansgate.audit' has no attribute {name!r}")
