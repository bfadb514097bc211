"""Reading everything an audit needs from files into ``AuditInputs``; the first problem raises one error.

The data's input spec comes from the bundle's manifest, so an ImageFolder needs no preprocessing
flags: images are read in the manifest's colour mode (``L`` or ``RGB``), resized bilinearly to the
manifest's height and width without cropping (the policy of ``data.datasets``, which the refine side
read them with), scaled from [0, 1] to the manifest's value range. An ``.npz`` must already hold
samples of the bundle's shape.

The data are opened without reading the images (``data.streaming.LazyImages``); a seeded subset
(``max_samples``) is drawn before anything is read, so only the audited images are ever decoded.
At most ``held_mb`` of images are held in memory: larger data are streamed from disk for the
sections that need predictions only, and a seeded subset that fits is held for the torch sections
(``audit.runner``); the same bound applies to the training data of the influence ranking. Notes in
the report say what was held and what was streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hansgate.audit.explain import sample_indices
from hansgate.audit.inputs import (
    load_source_model,
    read_attributes,
    source_weights_path,
)
from hansgate.audit.runner import AuditInputs
from hansgate.bundle import load_bundle
from hansgate.data.datasets import LazyLabelled, open_labelled
from hansgate.data.streaming import LazyImages
from hansgate.errors import DataError
from hansgate.manifest import InputSpec

__all__ = ["AuditSources", "RESIZE_POLICY", "HELD_MB", "load_audit_data", "load_inputs"]

#: How ImageFolder images are brought to the bundle's size (``data.datasets._from_folder``).
RESIZE_POLICY = "bilinear resize to the manifest's height x width, no crop"
#: Default bound on the images an audit holds in memory (MiB), per data set
HELD_MB = 256.0


@dataclass(frozen=True)
class AuditSources:
    """Where an audit's inputs are (the command line's arguments, without argparse)."""

    bundle: str | Path
    data: str | Path
    attributes: str | Path
    before: str | Path | None = None
    source_weights: str | Path | None = None
    no_source: bool = False
    train_data: str | Path | None = None
    train_artifact: str | None = None
    region_mask: str | Path | None = None
    max_samples: int | None = None
    seed: int = 0
    held_mb: float = HELD_MB


def load_audit_data(path: str | Path, spec: InputSpec) -> tuple[LazyLabelled, str]:
    """Labelled data at the bundle's input spec (images still on disk), and a note saying how it was read."""
    lo, hi = spec.value_range
    data = open_labelled(path, channels=spec.channels, size=(spec.height, spec.width))
    if Path(path).is_dir():
        if (lo, hi) != (0.0, 1.0):
            data = LazyLabelled(data.x.scaled(hi - lo, lo), data.y, data.classes)
        note = (f"ImageFolder read at the manifest's input spec: {spec.color_mode}, "
                f"{spec.channels}x{spec.height}x{spec.width}, values in [{lo:g}, {hi:g}], {RESIZE_POLICY}")
        return data, note
    if tuple(data.x.shape[1:]) != spec.shape:
        raise DataError(f"{path}: samples have shape {tuple(data.x.shape[1:])}, the bundle expects {spec.shape}")
    return data, ""


def _held(x: LazyImages, what: str, held_mb: float, seed: int) -> tuple[torch.Tensor, np.ndarray | None, str]:
    """``x`` read into one tensor when it fits ``held_mb``, else a seeded subset that fits; its positions
    (``None``: all of ``x``) and the note that says which."""
    if held_mb <= 0:
        raise DataError(f"the memory bound for held images must be positive, got {held_mb:g} MB")
    per = int(np.prod(tuple(x.shape[1:]))) * 4
    cap = max(1, int(held_mb * 2**20 // per))
    if len(x) <= cap:
        mb = len(x) * per / 2**20
        return x.take(slice(None)), None, f"{what}: {len(x)} images held in memory ({mb:.0f} MB)"
    idx = sample_indices(len(x), cap, seed)
    return x.take(idx), idx, (f"{what}: {len(x)} images, more than {held_mb:g} MB; a seeded subset of {cap} "
                              f"held in memory ({cap * per / 2**20:.0f} MB)")


def _train_artifact_flags(path: str | Path, x: torch.Tensor, index: np.ndarray | None, n: int,
                          artifact: str | None) -> np.ndarray | None:
    """The held training images' ``artifact`` flags from the .npz (``n`` entries, then ``index``), else
    which held images carry ``artifact``."""
    if Path(path).suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "artifact" in z.files:
                flags = np.asarray(z["artifact"]).astype(bool)
                if len(flags) != n:
                    raise DataError(f"{path}: 'artifact' has {len(flags)} entries, 'y' {n}")
                return flags if index is None else flags[index]
    if artifact is None:
        return None
    from hansgate.audit.artifact_tests import carries, resolve_artifacts

    return carries(x, resolve_artifacts([artifact])[0])


def _region_mask(path: str | Path, spec: InputSpec) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"region mask not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"cannot read region mask {p}: {exc}") from exc
    if arr.shape != (spec.height, spec.width):
        raise DataError(f"region mask {p} has shape {arr.shape}, images are {(spec.height, spec.width)}")
    return torch.from_numpy((arr > 0).astype(np.float32))


def load_inputs(src: AuditSources) -> AuditInputs:
    """Read and check every input; the source model is checked against the manifest's hash."""
    bundle = load_bundle(src.bundle)
    m = bundle.manifest
    data, note = load_audit_data(src.data, m.input)
    if len(data.classes) != len(m.classes) or int(data.y.max()) >= len(m.classes):
        raise DataError(f"{src.data}: {len(data.classes)} classes, the bundle has {len(m.classes)}")
    attributes = read_attributes(src.attributes, len(data.y), m)
    lazy, y = data.x, data.y
    notes = [note] if note else []
    if src.max_samples is not None and src.max_samples < len(y):
        idx = sample_indices(len(y), src.max_samples, src.seed)
        lazy, y = lazy.subset(idx), y[torch.as_tensor(idx)]
        attributes = {a: v[idx] for a, v in attributes.items()}
        notes.append(f"seeded subset of {len(idx)} samples")
    x, explained, held = _held(lazy, "audited data", src.held_mb, src.seed)
    notes.append(held)
    images = lazy if explained is not None else None
    if images is not None:
        notes.append(f"predictions, subgroups, fairness, calibration and the bundle's TCAV read all {len(y)} "
                     f"images from disk a batch at a time; heatmaps, artifact tests, concepts and influence use "
                     f"the {len(x)} held images")
    before_bundle = load_bundle(src.before) if src.before else None
    source_model, weights = None, None
    if not src.no_source:
        weights = source_weights_path(bundle, src.source_weights)
        if weights is not None:
            source_model = load_source_model(bundle, weights)
        else:
            notes.append("source model weights not found next to the bundle: no attributions")
    train_x = train_y = train_art = None
    if src.train_data:
        tr, _ = load_audit_data(src.train_data, m.input)
        train_x, kept, held = _held(tr.x, "training data", src.held_mb, src.seed)
        notes.append(held)
        train_art = _train_artifact_flags(src.train_data, train_x, kept, len(tr.y), src.train_artifact)
        train_y = tr.y if kept is None else tr.y[torch.as_tensor(kept)]
    region = _region_mask(src.region_mask, m.input) if src.region_mask else None
    return AuditInputs(bundle=bundle, x=x, y=y, classes=list(m.classes), attributes=attributes,
                       data_path=str(src.data), attributes_path=str(src.attributes), before_bundle=before_bundle,
                       source_model=source_model, source_weights=str(weights) if weights else None,
                       train_x=train_x, train_y=train_y, train_artifact=train_art, region_mask=region,
                       region_mask_name=Path(src.region_mask).name if src.region_mask else None, notes=notes,
                       images=images, explained=explained)

