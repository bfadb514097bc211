"""What an audit can be told (``AuditConfig``); the command line maps its flags onto it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hansgate.audit.compliance import ComplianceThresholds

__all__ = ["AuditConfig"]


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
    parity_bound: float = Field(0.8, gt=0, le=1, description="flag selection-rate ratios below this (four-fifths)")
    odds_margin: float = Field(0.10, gt=0, lt=1, description="flag true/false-positive-rate gaps above this")
    pdf: bool = True
    seed: int = 0

    def thresholds(self) -> ComplianceThresholds:
        """The flag rules shared with the gateway's compliance snapshot."""
        return ComplianceThresholds(recall_margin=self.recall_margin, min_samples=self.min_samples, z=self.z)
