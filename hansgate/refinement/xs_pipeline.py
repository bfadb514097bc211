"""From a model, data and masks to a bundle, training with explanatory supervision (``hansgate train``).

Masks come from a file (``--masks``: an ``.npz`` with ``mask`` ``[N, 1, H, W]`` or
``[N, H, W]``, 1 on the pixels to ignore), or from a teacher pre-trained on a small
clean set (``--teacher-share``, paper 002 Eq. 13-15). ``data="decoy"`` uses the
embedded decoy digits (``refinement.decoy``): ground-truth masks, a clean pool for
teachers, and permuted validation/test splits. ``lambda`` is fixed, or tuned as
paper 002 does (lowest cross-entropy on a validation set whose spurious signal is
permuted). This module only reads what XS needs beyond the shared data options (masks,
the teacher's clean set, validation and permuted splits, the decoy digits); training
is the registry's XS refiner (``refinement.registry``) and the rest is the one pipeline
(``refinement.pipeline.refine``), like every refined model.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hansgate.bundle import Bundle
from hansgate.errors import ConfigError, DataError
from hansgate.refinement.pipeline import DataOptions, Inputs, refine
from hansgate.refinement.refiners import RefinerConfig, TrainXSConfig
from hansgate.refinement.registry import get_refiner

__all__ = ["DEFAULT_LAMBDAS", "TrainXSConfig", "load_masks", "xs_inputs", "train_xs_from_files"]

#: Default lambda per method when none is given: what the decoy benchmark tuned for small_vgg with ground-truth
#: masks, carried to the reference scales of RRR (per-sample mask-area normalisation: x16 for 16-pixel masks) and
#: RBR (summed elements, batch-mean influence: x64 at batch 64); tune on your own permuted validation data.
DEFAULT_LAMBDAS: dict[str, float] = {"tap": 3e-3, "rrr": 1.6e3, "rbr": 6.4e5, "none": 0.0}


def load_masks(path: str | Path, like: torch.Tensor) -> torch.Tensor:
    """Read masks from ``.npz`` key ``mask`` (no pickle) and check them against images ``like`` ``[N, C, H, W]``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"mask file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "mask" not in z:
                raise DataError(f"{p} must hold an array 'mask' (has {sorted(z.files)})")
            arr = z["mask"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {p} as .npz: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[:, None]
    n, _, h, w = like.shape
    if arr.shape != (n, 1, h, w):
        raise DataError(f"{p}: masks of shape {arr.shape} do not fit {n} images of {h}x{w}; expected [N, 1, H, W]")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise DataError(f"{p}: masks must be finite numbers in [0, 1]")
    return torch.from_numpy(arr.astype(np.float32))


def _teacher_masks(config: TrainXSConfig, x: torch.Tensor, y: torch.Tensor, clean: tuple[torch.Tensor, torch.Tensor],
                   n_classes: int, truth: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Masks from a teacher fitted on the clean set (paper 002 Eq. 13-15)."""
    from hansgate.refinement.teacher import Teacher, TeacherConfig, mask_precision_recall

    t0 = time.perf_counter()
    teacher = Teacher(TeacherConfig(model=config.teacher_model, tau=config.teacher_tau,
                                    epochs=config.teacher_epochs, seed=config.xs.seed))
    teacher.fit(clean[0], clean[1], num_classes=n_classes)
    masks = teacher.masks(x, y)
    info: dict[str, Any] = {"source": "teacher", "teacher_share": config.teacher_share,
                            "teacher_images": len(clean[1]), "teacher_model": config.teacher_model,
                            "tau": config.teacher_tau, "teacher_fit_s": time.perf_counter() - t0}
    if truth is not None:
        info["vs_ground_truth"] = mask_precision_recall(masks, truth)
    return masks, info


def _decoy_inputs(config: TrainXSConfig) -> tuple[Inputs, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    from hansgate.data.decoy import DecoyConfig, make_decoy

    dd = make_decoy(DecoyConfig(seed=config.xs.seed))
    if config.n_train:
        dd = dd.subset(config.n_train, config.xs.seed)
    clean = dd.teacher_subset(config.teacher_share, config.xs.seed) if config.teacher_share is not None else None
    c = int(dd.x_train.shape[1])
    inputs = Inputs(dd.x_train, dd.y_train, list(dd.classes), [0.0] * c, [1.0] * c,
                    f"train: decoy digits (seed {config.xs.seed}, {len(dd.y_train)} training images); "
                    "test/permuted: given",
                    {"acc_contaminated": (dd.x_test, dd.y_test), "acc_permuted": (dd.x_test_permuted, dd.y_test)},
                    val=(dd.x_val_permuted, dd.y_val))
    return inputs, dd.mask_train, clean


def xs_inputs(data: str, config: TrainXSConfig, options: DataOptions | None = None, *, masks: str | None = None,
              teacher_data: str | None = None, val_data: str | None = None, test_data: str | None = None,
              permuted_data: str | None = None, log: Callable[[str], None] | None = None) -> Inputs:
    """Step 1 of the pipeline for ``hansgate train``: training data with masks, validation and test splits."""
    log = log or (lambda msg: None)
    opts = options or DataOptions()
    method = config.xs.method
    if masks is not None and config.teacher_share is not None:
        raise ConfigError("give either --masks or --teacher-share, not both")
    if method != "none" and masks is None and config.teacher_share is None and data != "decoy":
        raise ConfigError("give exactly one of --masks or --teacher-share (with --teacher-data)")
    truth: torch.Tensor | None = None
    clean: tuple[torch.Tensor, torch.Tensor] | None = None
    if data == "decoy":
        if opts.mean or opts.std:
            raise ConfigError("--data decoy is raw grey pixels for a model without normalisation; drop --mean/--std")
        inputs, truth, clean = _decoy_inputs(config)
    else:
        ds = opts.load(data)
        c = int(ds.x.shape[1])
        evaluation = {key: (extra.x, extra.y) for key, path in (("acc_contaminated", test_data),
                                                                ("acc_permuted", permuted_data))
                      if path for extra in [opts.load(path)]}
        val = None
        if val_data:
            v = opts.load(val_data)
            val = (v.x, v.y)
        inputs = Inputs(ds.x, ds.y, list(opts.classes or ds.classes), list(opts.mean or [0.0] * c),
                        list(opts.std or [1.0] * c),
                        f"train: {data}; test/permuted: {'given' if test_data else 'none'}", evaluation, val=val)
        if config.teacher_share is not None:
            if not teacher_data:
                raise ConfigError("--teacher-share needs --teacher-data: a small clean labelled set")
            tds = opts.load(teacher_data)
            n = max(2, int(round(config.teacher_share * len(ds.y))))
            if len(tds.y) < n:
                raise DataError(f"--teacher-share {config.teacher_share} asks for {n} clean images; {teacher_data} "
                                f"holds {len(tds.y)}")
            perm = torch.randperm(len(tds.y), generator=torch.Generator().manual_seed(config.xs.seed))[:n]
            clean = (tds.x[perm], tds.y[perm])
    inputs.check()
    if config.lambdas and inputs.val is None:
        raise ConfigError("tuning lambda needs --val-data: validation images whose spurious signal is permuted")
    _, h, w = inputs.shape
    if method == "none":
        inputs.masks, inputs.mask_info = torch.zeros(len(inputs.y), 1, h, w), {"source": "none"}
    elif config.teacher_share is not None:
        assert clean is not None
        inputs.masks, inputs.mask_info = _teacher_masks(config, inputs.x, inputs.y, clean, len(inputs.classes), truth)
    elif masks is not None:
        inputs.masks, inputs.mask_info = load_masks(masks, inputs.x), {"source": "file", "path": str(masks)}
    else:
        assert truth is not None
        inputs.masks, inputs.mask_info = truth, {"source": "ground truth (decoy patches)"}
    log(f"masks: {inputs.mask_info}")
    return inputs


def train_xs_from_files(*, model_spec: str, weights: str | None, data: str, out: str | Path, config: TrainXSConfig,
                        masks: str | None = None, teacher_data: str | None = None, val_data: str | None = None,
                        test_data: str | None = None, permuted_data: str | None = None,
                        options: DataOptions | None = None, overwrite: bool = False,
                        log: Callable[[str], None] | None = None) -> tuple[Bundle, dict[str, Any]]:
    """``hansgate train --xs METHOD``: train with explanatory supervision and write the bundle atomically."""
    refiner = get_refiner(config.xs.method, "xs")
    if Path(out).exists() and not overwrite:
        raise DataError(f"output {out} exists; pass --overwrite to replace it")
    inputs = xs_inputs(data, config, options, masks=masks, teacher_data=teacher_data, val_data=val_data,
                       test_data=test_data, permuted_data=permuted_data, log=log)
    bundle, summary = refine(refiner, inputs, model_spec=model_spec, weights=weights, out=out,
                             config=RefinerConfig(xs=config), overwrite=overwrite, log=log)
    hp = summary["hyperparameters"]
    return bundle, summary | {"lambda": hp["lam"], "masks": hp["masks"], "train_s": summary["timings"]["train_s"]}
