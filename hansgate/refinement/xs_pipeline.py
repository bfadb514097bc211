"""From a model, data and masks to a bundle, training with explanatory supervision (``hansgate train``).

Masks come from a file (``--masks``: an ``.npz`` with ``mask`` ``[N, 1, H, W]`` or
``[N, H, W]``, 1 on the pixels to ignore), or from a teacher pre-trained on a small
clean set (``--teacher-share``, paper 002 Eq. 13-15). ``data="decoy"`` uses the
embedded decoy digits (``refinement.decoy``): ground-truth masks, a clean pool for
teachers, and permuted validation/test splits. ``lambda`` is fixed, or tuned as
paper 002 does (lowest cross-entropy on a validation set whose spurious signal is
permuted). The trained model is exported through ``refinement.pipeline.build_bundle``
like every refined model.
"""

from __future__ import annotations

import copy
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from hansgate.bundle import Bundle
from hansgate.errors import ConfigError, DataError
from hansgate.manifest import Evaluation, InputSpec, SourceModel
from hansgate.nn.training import accuracy, predict_logits
from hansgate.refinement.methods import RefinementResult
from hansgate.refinement.selection import Candidate, SlackSelection
from hansgate.refinement.xs import XSConfig, tap_layers, train_xs

__all__ = ["DEFAULT_LAMBDAS", "TrainXSConfig", "LambdaSelection", "load_masks", "train_xs_from_files"]

#: Default lambda per method when none is given: what the decoy benchmark tuned for small_vgg with ground-truth
#: masks (benchmarks/results/xs.json); tune on your own permuted validation data where you can.
DEFAULT_LAMBDAS: dict[str, float] = {"tap": 3e-3, "rrr": 1e2, "rbr": 1e4, "none": 0.0}


class TrainXSConfig(BaseModel):
    """Options of ``hansgate train``; ``xs`` holds the training hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    xs: XSConfig
    lambdas: tuple[float, ...] | None = Field(None, description="candidates to tune on permuted validation data")
    teacher_share: float | None = Field(None, gt=0, le=1)
    teacher_tau: float = Field(0.01, gt=0, le=1)
    teacher_epochs: int = Field(30, ge=1)
    teacher_model: str = "mnist_cnn"
    n_train: int | None = Field(None, ge=2, description="decoy data only: training images to use")


@dataclass
class LambdaSelection(SlackSelection):
    """The lambda choice of paper 002: lowest cross-entropy on permuted validation data (not the slack rule).

    ``candidates`` hold each lambda with its validation accuracy; ``val_losses`` the
    cross-entropy that decided. With a fixed lambda there is one candidate.
    """

    rule: str = "fixed"
    val_losses: list[float | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "chosen": self.chosen.params, "chosen_val_acc": self.chosen.val_acc,
                "candidates": [{"params": c.params, "val_acc": c.val_acc,
                                **({"val_loss": v} if v is not None else {})}
                               for c, v in zip(self.candidates, self.val_losses or [None] * len(self.candidates))]}


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


@dataclass
class _Split:
    x: torch.Tensor
    y: torch.Tensor


def _scores(model: torch.nn.Module, train: _Split, test: _Split | None, permuted: _Split | None) -> dict[str, float]:
    out = {"train_acc": accuracy(model, train.x, train.y)}
    if test is not None:
        out["acc_contaminated"] = accuracy(model, test.x, test.y)
    if permuted is not None:
        out["acc_permuted"] = accuracy(model, permuted.x, permuted.y)
    if test is not None and permuted is not None:
        out["delta"] = out["acc_contaminated"] - out["acc_permuted"]
    return out


def train_xs_from_files(
    *,
    model_spec: str,
    weights: str | None,
    data: str,
    out: str | Path,
    config: TrainXSConfig,
    masks: str | None = None,
    teacher_data: str | None = None,
    val_data: str | None = None,
    test_data: str | None = None,
    permuted_data: str | None = None,
    classes: list[str] | None = None,
    image_size: tuple[int, int] = (28, 28),
    channels: int = 1,
    overwrite: bool = False,
    log: Any = None,
) -> tuple[Bundle, dict[str, Any]]:
    """``hansgate train --xs METHOD``: train with explanatory supervision and write the bundle atomically."""
    from hansgate.data.datasets import load_labelled
    from hansgate.nn.models import load_model, source_sha256
    from hansgate.refinement.pipeline import build_bundle
    from hansgate.refinement.teacher import (
        Teacher,
        TeacherConfig,
        mask_precision_recall,
    )

    log = log or (lambda msg: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"output {out} exists; pass --overwrite to replace it")
    method = config.xs.method
    if masks is not None and config.teacher_share is not None:
        raise ConfigError("give either --masks or --teacher-share, not both")
    if method != "none" and masks is None and config.teacher_share is None and data != "decoy":
        raise ConfigError("give exactly one of --masks or --teacher-share (with --teacher-data)")

    truth: torch.Tensor | None = None
    val = test = permuted = None
    clean: tuple[torch.Tensor, torch.Tensor] | None = None
    if data == "decoy":
        from hansgate.data.decoy import DecoyConfig, make_decoy

        dd = make_decoy(DecoyConfig(seed=config.xs.seed))
        if config.n_train:
            dd = dd.subset(config.n_train, config.xs.seed)
        train, names, truth = _Split(dd.x_train, dd.y_train), dd.classes, dd.mask_train
        val, test = _Split(dd.x_val_permuted, dd.y_val), _Split(dd.x_test, dd.y_test)
        permuted = _Split(dd.x_test_permuted, dd.y_test)
        if config.teacher_share is not None:
            clean = dd.teacher_subset(config.teacher_share, config.xs.seed)
        source_data = f"decoy digits (seed {config.xs.seed}, {len(dd.y_train)} training images)"
    else:
        ds = load_labelled(data, channels=channels, size=image_size)
        train, names = _Split(ds.x, ds.y), classes or ds.classes
        for key, path in (("val", val_data), ("test", test_data), ("permuted", permuted_data)):
            if path:
                extra = load_labelled(path, channels=channels, size=image_size)
                split = _Split(extra.x, extra.y)
                val, test, permuted = (split if key == "val" else val, split if key == "test" else test,
                                       split if key == "permuted" else permuted)
        if config.teacher_share is not None:
            if not teacher_data:
                raise ConfigError("--teacher-share needs --teacher-data: a small clean labelled set")
            tds = load_labelled(teacher_data, channels=channels, size=image_size)
            n = max(2, int(round(config.teacher_share * len(train.y))))
            if len(tds.y) < n:
                raise DataError(f"--teacher-share {config.teacher_share} asks for {n} clean images; {teacher_data} "
                                f"holds {len(tds.y)}")
            perm = torch.randperm(len(tds.y), generator=torch.Generator().manual_seed(config.xs.seed))[:n]
            clean = (tds.x[perm], tds.y[perm])
        source_data = str(data)
    if len(names) < 2 or int(train.y.max()) >= len(names):
        raise DataError(f"labels go up to {int(train.y.max())} but {len(names)} class name(s) were given")
    if config.lambdas and val is None:
        raise ConfigError("tuning lambda needs --val-data: validation images whose spurious signal is permuted")

    c, h, w = train.x.shape[1:]
    torch.manual_seed(config.xs.seed)  # the initialisation of a built-in without weights
    initial = load_model(model_spec, weights, num_classes=len(names), in_channels=c, image_size=h)
    if (k_out := predict_logits(initial, train.x[:2]).shape[1]) != len(names):
        raise DataError(f"the model has {k_out} outputs but the data have {len(names)} classes")

    mask_info: dict[str, Any]
    if method == "none":
        train_masks, mask_info = torch.zeros(len(train.y), 1, h, w), {"source": "none"}
    elif config.teacher_share is not None:
        assert clean is not None
        t0 = time.perf_counter()
        teacher = Teacher(TeacherConfig(model=config.teacher_model, tau=config.teacher_tau,
                                        epochs=config.teacher_epochs, seed=config.xs.seed))
        teacher.fit(clean[0], clean[1], num_classes=len(names))
        train_masks = teacher.masks(train.x, train.y)
        mask_info = {"source": "teacher", "teacher_share": config.teacher_share, "teacher_images": len(clean[1]),
                     "teacher_model": config.teacher_model, "tau": config.teacher_tau,
                     "teacher_fit_s": time.perf_counter() - t0}
        if truth is not None:
            mask_info["vs_ground_truth"] = mask_precision_recall(train_masks, truth)
    elif masks is not None:
        train_masks, mask_info = load_masks(masks, train.x), {"source": "file", "path": str(masks)}
    else:
        assert truth is not None
        train_masks, mask_info = truth, {"source": "ground truth (decoy patches)"}
    log(f"masks: {mask_info}")

    lams = list(config.lambdas) if config.lambdas else [config.xs.lam]
    cands: list[Candidate] = []
    losses: list[float | None] = []
    best: tuple[int, torch.nn.Module, float] | None = None
    for lam in lams:
        model = copy.deepcopy(initial)
        t0 = time.perf_counter()
        train_xs(model, train.x, train.y, train_masks, config.xs.model_copy(update={"lam": lam}),
                 callback=lambda e, p: log(f"  lambda={lam:g} epoch {e + 1}: {p}"))
        secs = time.perf_counter() - t0
        if val is not None:
            loss = float(F.cross_entropy(predict_logits(model, val.x), val.y))
            cands.append(Candidate({"lam": lam}, accuracy(model, val.x, val.y)))
            losses.append(loss)
        else:
            cands.append(Candidate({"lam": lam}, accuracy(model, train.x, train.y)))
            losses.append(None)
        last, kept = losses[-1], (losses[best[0]] if best is not None else None)
        if best is None or (last is not None and kept is not None and last < kept):
            best = (len(cands) - 1, model, secs)
    assert best is not None
    idx, trained, secs = best
    rule = "min cross-entropy on permuted validation data (paper 002)" if config.lambdas else "fixed"
    selection = LambdaSelection(chosen=cands[idx], original_val_acc=0.0, slack=0.0, threshold=0.0,
                                candidates=cands, rule=rule, val_losses=losses)
    layers = (config.xs.layers or tap_layers(trained)) if method == "tap" else []
    hp = {"lam": cands[idx].params["lam"], "epochs": config.xs.epochs, "lr": config.xs.lr,
          "batch_size": config.xs.batch_size, "optimizer": "adam", "masks": mask_info}
    if method == "tap":
        hp |= {"tap_kernel": config.xs.tap_kernel, "tap_norm": config.xs.tap_norm}
    if method == "rbr":
        hp["inverse_hessian"] = "identity"
    result = RefinementResult(trained, method, layers, hp, selection, {"train_s": secs})
    evaluation = Evaluation(data=f"train: {source_data}; test/permuted: {'given' if test else 'none'}",
                            before=_scores(initial, train, test, permuted), after=_scores(trained, train, test, permuted))
    source_hash = source_sha256(model_spec, weights, initial)
    bundle = build_bundle(
        out, result, x_check=train.x[:256], classes=list(names),
        input_spec=InputSpec(channels=c, height=h, width=w, mean=[0.0] * c, std=[1.0] * c,
                             color_mode="L" if c == 1 else "RGB"),
        source=SourceModel(spec=model_spec, sha256=source_hash, weights=str(weights) if weights else None),
        evaluation=evaluation, overwrite=overwrite,
    )
    return bundle, {"method": method, "lambda": hp["lam"], "selection": selection.as_dict(), "masks": mask_info,
                    "before": evaluation.before, "after": evaluation.after, "train_s": secs}
