"""Concept data from files, for ClArC (``--method p-clarc|a-clarc|rr-clarc``) and watched concepts.

``--concept NAME=DATA`` takes either

- an ``.npz`` with ``x`` float32 ``[N, C, H, W]`` (raw pixels in [0, 1], like ``--data``),
  ``y`` int ``[N]`` (class labels, for RR-ClArC's validation and A-ClArC) and ``concept``
  bool ``[N]`` (True where the sample carries the concept); or
- two ImageFolder directories ``WITH,WITHOUT`` (comma-separated): samples with and
  without the concept, one sub-directory per class named like the data's classes
  (any subset of them), read with the data's ``--channels``/``--image-size``.

At least 4 samples with and 4 without the concept. The pipeline (``refinement.pipeline``)
checks the images against the data's shape and applies the same normalisation.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from hansgate.data.datasets import load_labelled
from hansgate.errors import ConfigError, DataError
from hansgate.refinement.clarc import ConceptData

__all__ = ["load_concept_data", "load_concept_folders", "load_concept", "parse_concept_args"]


def load_concept_data(path: str | Path) -> ConceptData:
    """Read concept data (module docstring) without unpickling; ``DataError`` with one reason otherwise."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".npz":
        raise DataError(f"concept data must be an existing .npz file or two ImageFolder directories WITH,WITHOUT, "
                        f"got {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = {"x", "y", "concept"} - set(z.files)
            if missing:
                raise DataError(f"{p} lacks array(s) {sorted(missing)} (needs x, y, concept)")
            x, y, c = z["x"], z["y"], z["concept"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {p} as .npz: {exc}") from exc
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise DataError(f"{p}: 'x' must be finite float [N, C, H, W], got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{p}: 'y' must be {len(x)} non-negative integers, got {y.dtype} {y.shape}")
    if c.shape != (len(x),) or c.dtype != np.bool_:
        raise DataError(f"{p}: 'concept' must be {len(x)} booleans, got {c.dtype} {c.shape}")
    return ConceptData(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)),
                       torch.from_numpy(c))


def load_concept_folders(with_dir: str | Path, without_dir: str | Path, classes: list[str], channels: int,
                         size: tuple[int, int]) -> ConceptData:
    """Concept data from two ImageFolders (with / without the concept); labels by class-directory name."""
    xs, ys, flags = [], [], []
    for path, flag in ((with_dir, True), (without_dir, False)):
        part = load_labelled(path, channels=channels, size=size, min_classes=1)
        unknown = sorted(set(part.classes) - set(classes))
        if unknown:
            raise DataError(f"concept folder {path}: class directories {unknown} are not among the data's classes "
                            f"{classes}")
        index = torch.tensor([classes.index(c) for c in part.classes])
        xs.append(part.x)
        ys.append(index[part.y])
        flags.append(torch.full((len(part.y),), flag))
    return ConceptData(torch.cat(xs), torch.cat(ys), torch.cat(flags))


def load_concept(source: str, classes: list[str], channels: int, size: tuple[int, int]) -> ConceptData:
    """``PATH.npz`` or ``WITH_DIR,WITHOUT_DIR`` (module docstring) as ``ConceptData`` in raw pixels."""
    if not Path(source).exists() and "," in source:
        with_dir, _, without_dir = source.rpartition(",")
        for d in (with_dir, without_dir):
            if not Path(d).is_dir():
                raise DataError(f"concept directory not found: {d}")
        return load_concept_folders(with_dir, without_dir, classes, channels, size)
    return load_concept_data(source)


def parse_concept_args(items: list[str] | None) -> dict[str, str]:
    """``["NAME=DATA", ...]`` -> ``{NAME: DATA}`` (names unique, manifest-safe)."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"--concept needs NAME=DATA with NAME of letters, digits, '_', '.', '-': {item!r}")
        if name in out:
            raise ConfigError(f"concept {name!r} given twice")
        out[name] = path
    return out
