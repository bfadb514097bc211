"""The demo's audit: original vs refined demo model on the deploy split (``hansgate demo`` calls this).

Writes next to the demo's other outputs:

- ``DIR/data/deploy_attributes.csv`` — the deploy split's subgroup attributes in the
  ``--attributes`` format (``audit.inputs``);
- ``DIR/data/train.npz`` — the biased training split with its ``artifact`` flags, for the
  influence ranking (``--train-data``);
- ``DIR/data/digit_region.npy`` — the ``[H, W]`` region where the digits are drawn, the
  region mask of the verification rule (``--region-mask``);
- ``DIR/audit/report.{html,json,pdf}`` and ``DIR/audit/figures/``.

so that ``hansgate audit DIR/bundle --data DIR/data/deploy.npz --attributes
DIR/data/deploy_attributes.csv --out DIR/audit2`` repeats it from the command line (add
``--train-data DIR/data/train.npz --region-mask DIR/data/digit_region.npy`` for the rest).
The demo holds the refined torch model in memory and passes it, so its report has heatmaps
of both models; from the command line only the source model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from hansgate.refinement.evaluation import SeedRun

__all__ = ["digit_region", "write_demo_audit"]


def digit_region(size: int) -> np.ndarray:
    """``[size, size]`` mask of the centred box the embedded digits are drawn in (``data.digits``)."""
    inner = round(size * 20 / 28)
    pad = (size - inner) // 2
    m = np.zeros((size, size), dtype=np.float32)
    m[pad : pad + inner, pad : pad + inner] = 1.0
    return m


def write_demo_audit(run: SeedRun, refined_model: nn.Module, out: str | Path, progress: bool = False) -> dict[str, Path]:
    """Write the demo data the audit needs and the audit of ``run.original`` vs the bundle in ``out/bundle``."""
    from hansgate.audit.inputs import write_attributes
    from hansgate.audit.report import find_chromium, write_report
    from hansgate.audit.config import AuditConfig
    from hansgate.audit.runner import AuditInputs, run_audit
    from hansgate.bundle import load_bundle
    from hansgate.data.datasets import save_npz

    out = Path(out)
    d = run.data
    attrs_csv = write_attributes(out / "data" / "deploy_attributes.csv", d.attributes_deploy)
    save_npz(out / "data" / "train.npz", d.x_train, d.y_train, d.classes, artifact=d.artifact_train.numpy())
    region = digit_region(d.x_deploy.shape[-1])
    np.save(out / "data" / "digit_region.npy", region)
    notes = []
    pdf = find_chromium() is not None
    if not pdf:
        notes.append("headless Chromium not installed: no PDF rendering")
    artifacts = tuple(dict.fromkeys([d.config.artifact, "frame", "stamp", "dot"]))
    inputs = AuditInputs(
        bundle=load_bundle(out / "bundle"), x=d.x_deploy, y=d.y_deploy, classes=list(d.classes),
        attributes={k: np.asarray(v).astype(str) for k, v in d.attributes_deploy.items()},
        data_path=str(out / "data" / "deploy.npz"), attributes_path=str(attrs_csv),
        source_model=run.original, source_weights=str(out / "source_model.safetensors"), after_torch=refined_model,
        train_x=d.x_train, train_y=d.y_train, train_artifact=d.artifact_train.numpy(),
        region_mask=torch.from_numpy(region), region_mask_name="digit_region.npy", notes=notes)
    report = run_audit(inputs, AuditConfig(artifacts=artifacts, pdf=pdf),
                       progress=(lambda s: print(f"audit: {s}")) if progress else None)
    return write_report(out / "audit", report, pdf=pdf, overwrite=True)
