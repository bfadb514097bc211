"""The served model as a torch module: rebuilt from the bundle's refined weights and checked against its graph.

What: a bundle of schema 1.2 carries the refined model's full state dict (``refined.safetensors``,
never pickle) and the units to insert into the source architecture (``manifest.refined``).
``rebuild_served`` verifies the file's sha256 against the manifest, rebuilds the module
(``nn.units.rebuild``) on the source model (or, without its weights, on a fresh model of the
source's architecture: every tensor comes from the refined state dict), and runs it beside
``model.onnx`` on audited samples. More than ``nn.export.allowed_difference`` (the bound
the export was held to) between the two refuses the audit: heatmaps of a module that is not
the served one would explain the wrong model.

Why: the gateway serves the ONNX graph; explanations (heatmaps, TCAV, influence) need torch.
Explaining the source model instead describes the shortcut that refinement was meant to remove,
not the model in production. Bundles without refined weights (schema 1.0/1.1, or a method whose
inserted module cannot be rebuilt) are still audited, by their predictions, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from hansgate.audit.inputs import onnx_predictor
from hansgate.audit.roles import torch_predictor
from hansgate.bundle import Bundle, verify_refined
from hansgate.errors import BundleError, ModelLoadError
from hansgate.nn.export import LOGIT_TOLERANCE, allowed_difference

__all__ = ["SERVED", "SOURCE", "ServedModel", "explained_name", "rebuild_served", "served_model"]

#: how the report names the model a figure explains
SERVED = "served (refined) model"
SOURCE = "source model"
#: audited samples the rebuilt module is compared with the graph on
PARITY_SAMPLES = 64


def explained_name(role: str) -> str:
    """The report's name for the torch model of ``role``: ``after`` is the served model, the others the source."""
    return SERVED if role == "after" else SOURCE


@dataclass(frozen=True)
class ServedModel:
    """How the audit obtained the served model's torch module, as the report's ``served`` section says it."""

    status: Literal["rebuilt", "given", "absent"]
    module: nn.Module | None = None
    reason: str = ""
    max_abs_logit_diff: float | None = None
    samples: int = 0
    #: the largest difference allowed on these samples (``nn.export.allowed_difference``)
    tolerance: float = LOGIT_TOLERANCE

    @property
    def explains(self) -> str:
        return SERVED if self.module is not None else SOURCE

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"status": self.status, "explains": self.explains, "reason": self.reason}
        if self.status == "rebuilt":
            out |= {"max_abs_logit_diff": self.max_abs_logit_diff, "samples": self.samples,
                    "tolerance": self.tolerance}
        return out


def rebuild_served(bundle: Bundle, source_model: nn.Module | None = None) -> nn.Module:
    """The refined module of ``bundle`` (takes normalised inputs, like the source model), eval mode.

    Raises ``BundleHashError`` when the weights file is not the manifest's, ``BundleError`` when
    it cannot be read or does not fit the source architecture.
    """
    from hansgate.nn.models import load_model
    from hansgate.nn.units import load_state_bytes, rebuild

    m = bundle.manifest
    if m.refined is None:
        raise BundleError(f"bundle {bundle.path} carries no refined weights")
    path = verify_refined(bundle.path, m)
    try:
        state = load_state_bytes(path.read_bytes())
        if source_model is None:
            spec = m.source_model.spec
            name = spec.split(":", 1)[1] if spec.startswith("builtin:") else spec
            source_model = load_model(name, None, num_classes=len(m.classes), in_channels=m.input.channels,
                                      image_size=m.input.height)
        units = [(u.layer, str(u.kind), dict(u.options)) for u in m.refined.inserted]
        return rebuild(source_model, units, state)
    except ModelLoadError as exc:
        raise BundleError(f"cannot rebuild the served model of {bundle.path}: {exc}") from None


def served_model(bundle: Bundle, x: torch.Tensor, source_model: nn.Module | None = None,
                 given: nn.Module | None = None) -> ServedModel:
    """The served model for the audit: ``given`` (a caller's refined module), else rebuilt and checked.

    ``x``: audited raw pixels; the first ``PARITY_SAMPLES`` compare the rebuilt module with
    ``model.onnx``. A disagreement above ``nn.export.allowed_difference`` raises ``BundleError``.
    """
    if given is not None:
        return ServedModel("given", given, "the refined torch module was passed in by the caller")
    m = bundle.manifest
    if m.refined is None:
        why = (f"manifest schema {m.schema_version} carries no refined weights" if m.schema_version in ("1.0", "1.1")
               else f"the bundle carries no refined weights (method {m.method.name})")
        return ServedModel("absent", None, f"{why}: the served model is audited by its predictions; heatmaps, "
                                           "TCAV and influence explain the source model")
    module = rebuild_served(bundle, source_model)
    xs = x[:PARITY_SAMPLES].numpy().astype(np.float32)
    if len(xs) == 0:
        raise BundleError("no audited samples to check the rebuilt served model on")
    got = torch_predictor(module, m.input)(xs)
    want = onnx_predictor(bundle)(xs)
    diff = float(np.abs(got - want).max())
    allowed = allowed_difference(want)
    if not np.isfinite(diff) or diff > allowed:
        raise BundleError(f"the served model rebuilt from {m.refined.file} disagrees with {m.graph.file}: max "
                          f"|logit difference| {diff:.3g} > {allowed:.3g} on {len(xs)} audited samples; "
                          "refusing to explain a model that is not the one served")
    return ServedModel("rebuilt", module, f"rebuilt from {m.refined.file} and checked against {m.graph.file}",
                       diff, len(xs), allowed)
