"""Tiny seeded bundles for the service tests: with concept heads (3 outputs) and without."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import hansgate
from hansgate.bundle import Bundle, sha256_bytes, write_bundle
from hansgate.manifest import (
    CalibrationSpec,
    ConceptSpec,
    GraphOutput,
    GraphSpec,
    InputSpec,
    Manifest,
    MethodSpec,
    SourceModel,
    SubgroupAttribute,
)
from hansgate.nn.export import OPSET, export_checked

CLASSES = ["cat", "dog", "fox"]
CONCEPTS = ["stripes", "stamp"]
SHAPE = (1, 8, 8)


class TinyConceptNet(nn.Module):
    """conv -> pooled features h [N, D] -> MLP logits; concept heads on h.

    ``concept_scores = (h - mean) @ V^T`` for unit CAVs ``V [M, D]``;
    ``concept_sensitivity[n, m, k] = (f_k(h + eps v_m) - f_k(h - eps v_m)) / (2 eps)`` (central
    differences through the head, as the bundle contract allows).
    """

    def __init__(self, seed: int, concepts: bool, eps: float = 1e-2, n_concepts: int = len(CONCEPTS)) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, len(CLASSES)))
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)
        v = torch.randn(n_concepts, 6, generator=g)
        self.register_buffer("cavs", v / v.norm(dim=1, keepdim=True))
        self.register_buffer("mean", torch.full((6,), 0.3))
        self.concepts = concepts
        self.eps = eps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x - 0.5)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor):
        h = self.features(x)
        logits = self.head(h)
        if not self.concepts:
            return logits
        scores = (h - self.mean) @ self.cavs.T
        step = self.eps * self.cavs  # [M, D]
        plus = self.head(h[:, None, :] + step[None])  # [N, M, K]
        minus = self.head(h[:, None, :] - step[None])
        return logits, scores, (plus - minus) / (2 * self.eps)


def make_bundle(out: Path, concepts: bool = True, seed: int = 0, calibration: CalibrationSpec | None = None,
                concept_names: list[str] = CONCEPTS) -> Bundle:
    torch.manual_seed(seed)
    model = TinyConceptNet(seed, concepts, n_concepts=len(concept_names)).eval()
    x_check = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    names = ["logits", "concept_scores", "concept_sensitivity"] if concepts else ["logits"]
    onnx_bytes, diff = export_checked(model, x_check, names)
    k, m = len(CLASSES), len(concept_names)
    shapes = {"logits": [None, k], "concept_scores": [None, m], "concept_sensitivity": [None, m, k]}
    specs = [ConceptSpec(name=c, layer="conv", cav_kind="signal", baseline_tcav={cls: 0.5 for cls in CLASSES},
                         presence_threshold=0.0) for c in concept_names] if concepts else []
    manifest = Manifest(
        hansgate_version=hansgate.__version__, classes=CLASSES,
        input=InputSpec(channels=1, height=8, width=8, mean=[0.5], std=[0.25], color_mode="L"),
        source_model=SourceModel(spec="test:tiny", sha256="0" * 64), method=MethodSpec(name="none"),
        concepts=specs,
        subgroups=[SubgroupAttribute(name="site", values=["A", "B"],
                                     baseline_recall={"A": {c: 0.9 for c in CLASSES}, "B": {c: 0.8 for c in CLASSES}}),
                   SubgroupAttribute(name="stroke", values=["thin", "thick"])],
        calibration=calibration,
        graph=GraphSpec(sha256=sha256_bytes(onnx_bytes), opset=OPSET,
                        outputs=[GraphOutput(name=n, shape=shapes[n]) for n in names], max_abs_logit_diff=diff))
    return write_bundle(out, onnx_bytes, manifest, overwrite=True)
