"""L1: data. The embedded Clever-Hans digits, their RGB variant with a patch shortcut, the decoy
digits, the artifact catalogue and labelled-image loading (``.npz`` or an ImageFolder directory).
"""

from __future__ import annotations

from hansgate.data.artifacts import ARTIFACTS, Artifact, get_artifact
from hansgate.data.rgb import RgbConfig, patch_mask, paste_patch, make_rgb_clever_hans
from hansgate.data.datasets import (
    IMAGE_SUFFIXES,
    LabelledImages,
    load_labelled,
    save_npz,
)
from hansgate.data.decoy import (
    DecoyConfig,
    DecoyData,
    contaminate,
    make_decoy,
    patch_values,
)
from hansgate.data.digits import (
    CleverHansConfig,
    CleverHansData,
    make_clever_hans,
    stroke_attribute,
)

__all__ = [
    "RgbConfig",
    "patch_mask",
    "paste_patch",
    "make_rgb_clever_hans",
    "Artifact",
    "ARTIFACTS",
    "get_artifact",
    "CleverHansConfig",
    "CleverHansData",
    "make_clever_hans",
    "stroke_attribute",
    "DecoyConfig",
    "DecoyData",
    "patch_values",
    "contaminate",
    "make_decoy",
    "LabelledImages",
    "load_labelled",
    "save_npz",
    "IMAGE_SUFFIXES",
]
