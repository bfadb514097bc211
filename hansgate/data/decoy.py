"""Decoy digits: the label-dependent corner patches of paper 002 on the embedded digits.

Paper 002 ("Datasets", after Ross et al. 2017) contaminates MNIST with
``SC(X*, y)``: a 4x4 patch in a random corner whose value is ``255 - 25 * y``
(here ``(255 - 25 y) / 255`` on images in [0, 1]). ``SC(X*, permute(y))`` draws the
patch values from a random permutation of the labels, which randomises the patch
assignment; a model that does not use the patch classifies both alike (paper 002,
Eq. 1). The ground-truth annotation mask is 1 on the patch (Eq. 2).

Images come from ``refinement.digits`` (the same 28x28 canvas and affine jitter as
the Clever-Hans data). Source digits are split before jittering into test, train,
validation (10 % of the training digits, as the paper reserves) and a clean pool
(10 % of the training digits, never contaminated) from which teachers are
pre-trained on 10 % or 1 % of the training size (paper 002, "teacher-student").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.datasets import load_digits

from hansgate.data.digits import CLASSES, CleverHansConfig, _canvas, _jitter
from hansgate.errors import ConfigError

__all__ = ["DecoyConfig", "DecoyData", "patch_values", "contaminate", "make_decoy"]

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


class DecoyConfig(BaseModel):
    """How to build the decoy digits; the patch follows paper 002 / Ross et al. (4x4, ``255 - 25 y``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    image_size: int = Field(28, ge=12, le=64)
    patch: int = Field(4, ge=1, le=8)
    train_share: float = Field(0.6, gt=0, lt=1, description="share of source digits for training (rest: test)")
    val_share: float = Field(0.1, gt=0, lt=0.5, description="share of training digits held out for validation")
    clean_share: float = Field(0.1, gt=0, lt=0.5, description="share of training digits kept clean for teachers")
    train_copies: int = Field(3, ge=1, le=20, description="jittered copies of each training digit")
    test_copies: int = Field(1, ge=1, le=20, description="jittered copies of each test/validation digit")
    jitter_shift: float = Field(2.0, ge=0.0)
    jitter_degrees: float = Field(10.0, ge=0.0)


def patch_values(labels: torch.Tensor) -> torch.Tensor:
    """Patch intensity per label, ``(255 - 25 y) / 255`` (paper 002, "Datasets"); ``[N]`` float."""
    return (255.0 - 25.0 * labels.float()) / 255.0


def contaminate(x: torch.Tensor, labels: torch.Tensor, corners: torch.Tensor, patch: int = 4
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``SC(X*, labels)``: paste a ``patch x patch`` square of ``patch_values(labels)`` in each image's corner.

    ``x`` ``[N, C, H, W]`` in [0, 1], ``labels`` ``[N]`` (the labels the patch encodes),
    ``corners`` ``[N]`` in 0..3 (top-left, top-right, bottom-left, bottom-right).
    Returns the contaminated copy and the ground-truth masks ``[N, 1, H, W]`` (1 on the patch).
    """
    n, _, h, w = x.shape
    if not (len(labels) == len(corners) == n):
        raise ConfigError(f"need one label and one corner per image ({n}), got {len(labels)} and {len(corners)}")
    mask = torch.zeros(n, 1, h, w, dtype=x.dtype)
    top = (corners >= 2).long() * (h - patch)
    left = (corners % 2).long() * (w - patch)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = (rows >= top.view(-1, 1, 1)) & (rows < top.view(-1, 1, 1) + patch) & \
        (cols >= left.view(-1, 1, 1)) & (cols < left.view(-1, 1, 1) + patch)
    mask[:, 0] = inside.to(x.dtype)
    value = patch_values(labels).to(x.dtype).view(-1, 1, 1, 1)
    return x * (1 - mask) + value * mask, mask


@dataclass
class DecoyData:
    """Splits of the decoy digits; ``x_*`` ``[N, 1, S, S]`` float32 in [0, 1], ``mask_*`` ``[N, 1, S, S]``.

    ``x_train``/``x_val``/``x_test`` carry ``SC(X*, y)``; ``*_permuted`` carry
    ``SC(X*, permute(y))`` on the same images and corners; ``*_clean`` are ``X*``.
    ``x_pool``/``y_pool`` is the clean pool for teachers.
    """

    config: DecoyConfig
    classes: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    mask_train: torch.Tensor
    x_train_clean: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mask_val: torch.Tensor
    x_val_permuted: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mask_test: torch.Tensor
    x_test_permuted: torch.Tensor
    x_test_clean: torch.Tensor
    x_pool: torch.Tensor
    y_pool: torch.Tensor

    def teacher_subset(self, share: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A clean subset of ``share`` times the training-set size (paper 002: 10 % or 1 %), from the pool."""
        n = int(round(share * len(self.y_train)))
        if not 0 < n <= len(self.y_pool):
            raise ConfigError(f"teacher share {share} asks for {n} clean images; the pool holds {len(self.y_pool)} "
                              f"(clean_share={self.config.clean_share})")
        idx = torch.randperm(len(self.y_pool), generator=torch.Generator().manual_seed(seed))[:n]
        return self.x_pool[idx], self.y_pool[idx]

    def subset(self, n_train: int, seed: int = 0) -> "DecoyData":
        """The same data with at most ``n_train`` training images (drawn under ``seed``), for quick runs."""
        idx = torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(seed))[:n_train]
        return DecoyData(**{**self.__dict__, "x_train": self.x_train[idx], "y_train": self.y_train[idx],
                            "mask_train": self.mask_train[idx], "x_train_clean": self.x_train_clean[idx]})


def make_decoy(config: DecoyConfig | None = None) -> DecoyData:
    """Build the decoy digits, deterministic under ``config.seed``."""
    cfg = config or DecoyConfig()
    digits = load_digits()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    jitter_cfg = CleverHansConfig(seed=cfg.seed, image_size=cfg.image_size, jitter_shift=cfg.jitter_shift,
                                  jitter_degrees=cfg.jitter_degrees)
    split: dict[str, list[int]] = {"train": [], "val": [], "pool": [], "test": []}
    for c in range(10):  # stratified split of source digits, before jittering
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_train = int(round(len(idx) * cfg.train_share))
        n_val, n_pool = int(round(n_train * cfg.val_share)), int(round(n_train * cfg.clean_share))
        split["val"].extend(idx[:n_val])
        split["pool"].extend(idx[n_val : n_val + n_pool])
        split["train"].extend(idx[n_val + n_pool : n_train])
        split["test"].extend(idx[n_train:])
    base = _canvas(digits.images, cfg.image_size)
    labels = torch.from_numpy(digits.target.astype(np.int64))

    def jittered(name: str, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = sorted(split[name])
        return _jitter(base[idx], copies, jitter_cfg, gen), labels[idx].repeat(copies)

    def contaminated(x: torch.Tensor, y: torch.Tensor, permuted: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        corners = torch.randint(0, 4, (len(y),), generator=gen)
        xs, mask = contaminate(x, y, corners, cfg.patch)
        if not permuted:
            return xs, mask, None
        xp, _ = contaminate(x, y[torch.randperm(len(y), generator=gen)], corners, cfg.patch)
        return xs, mask, xp

    x_tr, y_tr = jittered("train", cfg.train_copies)
    x_va, y_va = jittered("val", cfg.test_copies)
    x_te, y_te = jittered("test", cfg.test_copies)
    x_pool, y_pool = jittered("pool", cfg.train_copies)
    xs_tr, m_tr, _ = contaminated(x_tr, y_tr, permuted=False)
    xs_va, m_va, xp_va = contaminated(x_va, y_va, permuted=True)
    xs_te, m_te, xp_te = contaminated(x_te, y_te, permuted=True)
    assert xp_va is not None and xp_te is not None
    return DecoyData(
        config=cfg, classes=list(CLASSES),
        x_train=xs_tr, y_train=y_tr, mask_train=m_tr, x_train_clean=x_tr,
        x_val=xs_va, y_val=y_va, mask_val=m_va, x_val_permuted=xp_va,
        x_test=xs_te, y_test=y_te, mask_test=m_te, x_test_permuted=xp_te, x_test_clean=x_te,
        x_pool=x_pool, y_pool=y_pool,
    )
