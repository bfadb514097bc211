"""The embedded Clever-Hans dataset, built from scikit-learn's bundled digits.

Follows the modified MNIST of paper 000 (Sec. 4.1, Supp. C.1): a spurious artifact
is pasted on a share ``rate`` of the training images of one class; the refinement
pool holds only artifact-free training images (the "verified" data); the test set
comes clean and 100 % poisoned (artifact on every image, every class).

Images: the 8x8 digits (values 0-16) are scaled to [0, 1], resized to 20x20 and
centred in a 28x28 canvas like MNIST; each source digit yields several copies under
a small random affine jitter, so that the splits are large enough to train on.
Source digits are split between train and test before jittering, so no test image
is a jittered copy of a training image.

Subgroup attributes (documented, derived from the image):

- ``stroke``: ``"thick"`` if the image's ink mass (sum of pixel values) is above
  the median ink mass of its class in the same split, else ``"thin"``.
- ``site``: ``"B"`` if the image carries the artifact (the mark site B's scanner
  prints on everything it sends, the hospital-tag story), else ``"A"``. On the
  ``deploy`` split a seeded share ``site_b_share`` of the images come from site B,
  so the shortcut suppresses the recall of site B for every class but the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from sklearn.datasets import load_digits

from hansgate.data.artifacts import Artifact, get_artifact

__all__ = ["CleverHansConfig", "CleverHansData", "make_clever_hans", "stroke_attribute"]

CLASSES = [str(d) for d in range(10)]


class CleverHansConfig(BaseModel):
    """How to build the embedded dataset; every field has the paper's default where one exists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact: str = "corner"
    target_class: int = Field(8, ge=0, le=9)
    rate: float = Field(0.7, ge=0.0, le=1.0, description="share of target-class training images with the artifact")
    seed: int = 0
    image_size: int = Field(28, ge=12, le=64)
    train_share: float = Field(0.6, gt=0.0, lt=1.0, description="share of source digits used for training")
    train_copies: int = Field(4, ge=1, le=20, description="jittered copies of each training digit")
    test_copies: int = Field(2, ge=1, le=20, description="jittered copies of each test digit")
    jitter_shift: float = Field(2.0, ge=0.0, description="max translation in pixels")
    jitter_degrees: float = Field(10.0, ge=0.0)
    site_b_share: float = Field(0.3, ge=0.0, le=1.0, description="share of deploy images from site B")
    calibration_share: float = Field(0.0, ge=0.0, lt=0.5, description="share of the test source digits held out "
                                     "as a clean calibration split (temperature scaling), never in test or deploy")


@dataclass
class CleverHansData:
    """Tensors ``x`` ``[N, 1, S, S]`` float32 in [0, 1] and labels ``y`` ``[N]`` int64 per split."""

    config: CleverHansConfig
    artifact: Artifact
    classes: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    artifact_train: torch.Tensor
    x_refine: torch.Tensor
    y_refine: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_test_poisoned: torch.Tensor
    x_deploy: torch.Tensor
    y_deploy: torch.Tensor
    attributes_test: dict[str, np.ndarray] = field(default_factory=dict)
    attributes_deploy: dict[str, np.ndarray] = field(default_factory=dict)
    #: clean images of source digits seen neither in training nor in test/deploy (``calibration_share``)
    x_calib: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    y_calib: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _canvas(images: np.ndarray, size: int) -> torch.Tensor:
    """8x8 digits -> ``[N, 1, size, size]``: digit resized to 5/7 of the side and centred."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    inner = round(size * 20 / 28)
    x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = size - inner
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


def _jitter(x: torch.Tensor, copies: int, cfg: CleverHansConfig, gen: torch.Generator) -> torch.Tensor:
    """``copies`` versions of each image: the original, then random affine jitters."""
    out = [x]
    n, size = x.shape[0], x.shape[-1]
    for _ in range(copies - 1):
        angle = (torch.rand(n, generator=gen) * 2 - 1) * np.deg2rad(cfg.jitter_degrees)
        scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
        shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * cfg.jitter_shift * 2 / size
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out.append(F.grid_sample(x, grid, align_corners=False, padding_mode="zeros").clamp(0, 1))
    return torch.cat(out)


def stroke_attribute(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``"thick"``/``"thin"``: ink mass above/at-or-below the median of the image's class."""
    mass = x.flatten(1).sum(1)
    out = np.empty(len(y), dtype=object)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        med = mass[idx].median()
        out[idx.numpy()] = np.where((mass[idx] > med).numpy(), "thick", "thin")
    return out.astype(str)


def make_clever_hans(config: CleverHansConfig | None = None) -> CleverHansData:
    """Build the embedded dataset, deterministic under ``config.seed``."""
    cfg = config or CleverHansConfig()
    artifact = get_artifact(cfg.artifact)
    digits = load_digits()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    train_idx: list[int] = []
    test_idx: list[int] = []
    calib_idx: list[int] = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        cut = int(round(len(idx) * cfg.train_share))
        n_cal = int(round((len(idx) - cut) * cfg.calibration_share))
        train_idx.extend(idx[:cut])
        calib_idx.extend(idx[cut : cut + n_cal])
        test_idx.extend(idx[cut + n_cal :])
    base = _canvas(digits.images, cfg.image_size)
    labels = torch.from_numpy(digits.target.astype(np.int64))

    x_train = _jitter(base[train_idx], cfg.train_copies, cfg, gen)
    y_train = labels[train_idx].repeat(cfg.train_copies)
    is_target = y_train == cfg.target_class
    artifact_train = is_target & (torch.rand(len(y_train), generator=gen) < cfg.rate)
    x_train = artifact.apply_where(x_train, artifact_train)

    x_test = _jitter(base[test_idx], cfg.test_copies, cfg, gen)
    y_test = labels[test_idx].repeat(cfg.test_copies)
    from_b = torch.rand(len(y_test), generator=gen) < cfg.site_b_share
    x_deploy = artifact.apply_where(x_test, from_b)

    clean = ~artifact_train
    x_calib = _jitter(base[calib_idx], cfg.test_copies, cfg, gen) if calib_idx else torch.zeros(0, *x_test.shape[1:])
    return CleverHansData(
        config=cfg,
        artifact=artifact,
        classes=list(CLASSES),
        x_train=x_train,
        y_train=y_train,
        artifact_train=artifact_train,
        x_refine=x_train[clean],
        y_refine=y_train[clean],
        x_test=x_test,
        y_test=y_test,
        x_test_poisoned=artifact.apply(x_test),
        x_deploy=x_deploy,
        y_deploy=y_test.clone(),
        attributes_test={"stroke": stroke_attribute(x_test, y_test), "site": np.full(len(y_test), "A")},
        attributes_deploy={
            "stroke": stroke_attribute(x_test, y_test),
            "site": np.where(from_b.numpy(), "B", "A"),
        },
        x_calib=x_calib,
        y_calib=labels[calib_idx].repeat(cfg.test_copies) if calib_idx else torch.zeros(0, dtype=torch.int64),
    )
