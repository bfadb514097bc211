"""Reading a user's data: an ``.npz`` (``x`` float32 ``[N, C, H, W]``, ``y`` int) or an ImageFolder.

Every problem ends in one ``DataError`` with a one-line reason: a missing file, a
wrong key, shape or dtype, non-finite values, labels outside the classes.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hansgate.errors import DataError

__all__ = ["LabelledImages", "load_labelled", "save_npz", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class LabelledImages:
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]


def _from_npz(path: Path) -> LabelledImages:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{path} must hold arrays 'x' and 'y' (has {sorted(z.files)})")
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"]] if "classes" in z else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' must be [N, C, H, W], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: 'x' must be float32, got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be N={len(x)} integers, got shape {y.shape} dtype {y.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or infinite values")
    k = len(classes) if classes else int(y.max()) + 1 if len(y) else 0
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{path}: labels must lie in [0, {k}), got [{y.min()}, {y.max()}]")
    return LabelledImages(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)),
                          classes or [str(i) for i in range(k)])


def _from_folder(path: Path, channels: int, size: tuple[int, int], min_classes: int) -> LabelledImages:
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise DataError(f"ImageFolder images are read as grey (1 channel) or RGB (3 channels), not {channels}")
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < min_classes:
        raise DataError(f"{path}: an ImageFolder needs one sub-directory per class, at least {min_classes} "
                        f"(found {len(class_dirs)})")
    xs, ys = [], []
    mode = "L" if channels == 1 else "RGB"
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    resized = im.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
                    arr = np.asarray(resized, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {f}: {exc}") from exc
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"{path}: no images found")
    return LabelledImages(torch.from_numpy(np.stack(xs)), torch.tensor(ys), [d.name for d in class_dirs])


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
