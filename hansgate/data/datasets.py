"""Reading a user's data: an ``.npz`` (``x`` float32 ``[N, C, H, W]``, ``y`` int) or an ImageFolder.

``load_labelled`` reads everything into tensors; ``open_labelled`` reads the same files into
``data.streaming.LazyImages`` (labels in memory, images read in batches on demand), with
identical values. Every problem ends in one ``DataError`` with a one-line reason: a missing
file, a wrong key, shape or dtype, non-finite values, labels outside the classes.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hansgate.data.streaming import FolderSource, LazyImages, decode_image, npz_array_source, scan_finite
from hansgate.errors import DataError

__all__ = ["LabelledImages", "LazyLabelled", "load_labelled", "open_labelled", "save_npz", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class LabelledImages:
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]


@dataclass(frozen=True)
class LazyLabelled:
    """Labelled images whose pixels stay on disk (``x``) until read; labels ``y`` in memory."""

    x: LazyImages
    y: torch.Tensor
    classes: list[str]


def _npz_labels(path: Path, z: "np.lib.npyio.NpzFile", n: int | None = None) -> tuple[np.ndarray, list[str]]:
    """``y`` and the class names of an open ``.npz``, checked against ``n`` images."""
    y = z["y"]
    n = len(y) if n is None else n
    classes = [str(c) for c in z["classes"]] if "classes" in z else None
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be N={n} integers, got shape {y.shape} dtype {y.dtype}")
    k = len(classes) if classes else int(y.max()) + 1 if len(y) else 0
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{path}: labels must lie in [0, {k}), got [{y.min()}, {y.max()}]")
    return y, classes or [str(i) for i in range(k)]


def _from_npz(path: Path) -> LabelledImages:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{path} must hold arrays 'x' and 'y' (has {sorted(z.files)})")
            x = z["x"]
            if x.ndim != 4:
                raise DataError(f"{path}: 'x' must be [N, C, H, W], got shape {x.shape}")
            if not np.issubdtype(x.dtype, np.floating):
                raise DataError(f"{path}: 'x' must be float32, got {x.dtype}")
            y, classes = _npz_labels(path, z, len(x))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or infinite values")
    return LabelledImages(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), classes)


def _open_npz(path: Path, workers: int | None, log: Callable[[str], None] | None) -> LazyLabelled:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{path} must hold arrays 'x' and 'y' (has {sorted(z.files)})")
        source = npz_array_source(path, "x", log)
        if not np.issubdtype(source.dtype, np.floating):
            raise DataError(f"{path}: 'x' must be float32, got {source.dtype}")
        with np.load(path, allow_pickle=False) as z:
            y, classes = _npz_labels(path, z, source.n)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    scan_finite(source, str(path))
    return LazyLabelled(LazyImages(source, workers=workers), torch.from_numpy(y.astype(np.int64)), classes)


def _folder_files(path: Path, channels: int, min_classes: int) -> tuple[list[Path], list[int], list[str]]:
    """The image files of an ImageFolder, their labels and the class names (sorted directories)."""
    if channels not in (1, 3):
        raise DataError(f"ImageFolder images are read as grey (1 channel) or RGB (3 channels), not {channels}")
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < min_classes:
        raise DataError(f"{path}: an ImageFolder needs one sub-directory per class, at least {min_classes} "
                        f"(found {len(class_dirs)})")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise DataError(f"{path}: no images found")
    return files, labels, [d.name for d in class_dirs]


def _open_folder(path: Path, channels: int, size: tuple[int, int], min_classes: int,
                 workers: int | None) -> LazyLabelled:
    files, labels, classes = _folder_files(path, channels, min_classes)
    return LazyLabelled(LazyImages(FolderSource([str(f) for f in files], channels, size), workers=workers),
                        torch.tensor(labels), classes)


def _from_folder(path: Path, channels: int, size: tuple[int, int], min_classes: int) -> LabelledImages:
    files, labels, classes = _folder_files(path, channels, min_classes)
    mode = "L" if channels == 1 else "RGB"
    x = np.stack([decode_image(f, mode, size) for f in files])
    return LabelledImages(torch.from_numpy(x), torch.tensor(labels), classes)


def load_labelled(path: str | Path, channels: int = 1, size: tuple[int, int] = (28, 28), *,
                  min_classes: int = 2) -> LabelledImages:
    """Load labelled images from ``.npz`` or an ImageFolder directory.

    Folders: one sub-directory per class (sorted names give the labels; at least
    ``min_classes``), every image converted to ``channels`` (1: grey, 3: RGB), resized to
    ``size`` ``(H, W)`` bilinearly and scaled to [0, 1]. An ``.npz`` carries its own shape.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data not found: {p}")
    if p.is_dir():
        return _from_folder(p, channels, size, min_classes)
    if p.suffix != ".npz":
        raise DataError(f"{p}: data must be an .npz file or an ImageFolder directory")
    return _from_npz(p)


def open_labelled(path: str | Path, channels: int = 1, size: tuple[int, int] = (28, 28), *, min_classes: int = 2,
                  workers: int | None = None, log: Callable[[str], None] | None = None) -> LazyLabelled:
    """``load_labelled`` without holding the images: the same checks and values, read in batches on demand.

    An ``.npz`` is checked for finite values in one streamed pass; a compressed one is unpacked
    once to a temporary file (said through ``log``). ``workers``: DataLoader worker processes
    (default ``data.streaming.default_workers``).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data not found: {p}")
    if p.is_dir():
        return _open_folder(p, channels, size, min_classes, workers)
    if p.suffix != ".npz":
        raise DataError(f"{p}: data must be an .npz file or an ImageFolder directory")
    return _open_npz(p, workers, log)


def save_npz(path: str | Path, x: torch.Tensor, y: torch.Tensor, classes: list[str] | None = None,
             **extra: np.ndarray) -> Path:
    """Write data in the format ``load_labelled`` reads (plus named extra arrays, e.g. attributes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"x": x.numpy().astype(np.float32), "y": y.numpy().astype(np.int64), **extra}
    if classes is not None:
        arrays["classes"] = np.asarray(classes)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return path
