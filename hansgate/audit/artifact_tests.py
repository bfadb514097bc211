"""Known-artifact tests: the explicit test for a suspected shortcut (paper 003, Sec. 5-6).

Paper 003 finds that attributions, concept rankings and influence rankings reveal a
spurious signal only when one tests for it explicitly. This module does the test: paste a
candidate artifact onto clean samples and measure, per model,

- **flip rate**: share of samples whose predicted class changes;
- **accuracy drop**: accuracy on the clean samples minus accuracy on the pasted ones;
- **top target**: the class most flipped-to, with its share of the flips;
- **relevance share** (torch models only): share of absolute LRP relevance (for the
  predicted class of the pasted image) that falls inside the artifact's mask, next to the
  mask's area share (what a uniform heatmap would give) -- paper 000, Supp. F.1's measure.
  The default composite is epsilon-z+-box: its z^B rule keeps the first layer's relevance
  on the pixels that carry it, where EpsilonPlusFlat's flat rule spreads it evenly over the
  first layer's receptive field and so dilutes small masks;
- **TCAV** of the artifact's concept (``ArtifactResult.tcav``), filled in by the report's concept
  section (``audit.explain``) from its TCAV rankings.

An artifact is *flagged* for a model when its flip rate or its accuracy drop reaches the
configured threshold (defaults 0.10 and 0.05). Candidates are the built-in artifacts of
``refinement.artifacts`` (``corner``, ``frame``, ``stamp``, ``brightness``, ``lsb``, ``dot``) or user
patches (``PatchArtifact``: an array pasted at a position). "Clean" samples are those on
which the artifact is not already present (``carries``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.errors import ConfigError, DataError

__all__ = [
    "ArtifactLike",
    "PatchArtifact",
    "ArtifactTestConfig",
    "carries",
    "parse_patch_spec",
    "resolve_artifacts",
    "ModelArtifactResult",
    "ArtifactTcav",
    "ArtifactResult",
    "HeatmapFigure",
    "ArtifactTests",
    "artifact_prediction_test",
    "known_artifact_tests",
]

PredictFn = Callable[[np.ndarray], np.ndarray]


class ArtifactLike(Protocol):
    """What the tests need of an artifact (``refinement.artifacts.Artifact`` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def localized(self) -> bool: ...

    def mask(self, height: int, width: int) -> torch.Tensor: ...

    def apply(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PatchArtifact:
    """A user-supplied patch ``[C or 1, h, w]`` (values in the data's range) pasted at ``(row, col)``."""

    name: str
    patch: np.ndarray
    row: int
    col: int

    @property
    def localized(self) -> bool:
        return True

    def mask(self, height: int, width: int) -> torch.Tensor:
        h, w = self.patch.shape[-2:]
        if self.row < 0 or self.col < 0 or self.row + h > height or self.col + w > width:
            raise ConfigError(f"patch {self.name!r} ({h}x{w} at {self.row},{self.col}) does not fit a "
                              f"{height}x{width} image")
        m = torch.zeros(height, width)
        m[self.row : self.row + h, self.col : self.col + w] = 1.0
        return m

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        h, w = self.patch.shape[-2:]
        self.mask(x.shape[-2], x.shape[-1])  # bounds check
        p = torch.as_tensor(self.patch, dtype=x.dtype)
        if p.shape[0] not in (1, x.shape[1]):
            raise ConfigError(f"patch {self.name!r} has {p.shape[0]} channels, images have {x.shape[1]}")
        out[:, :, self.row : self.row + h, self.col : self.col + w] = p
        return out


def carries(x: torch.Tensor, artifact: ArtifactLike, tol: float = 1e-6) -> np.ndarray:
    """``[N]`` bool: images on which pasting ``artifact`` changes (almost) nothing, i.e. it is already there."""
    pasted = artifact.apply(x)
    return ((pasted - x).abs().flatten(1).amax(1) <= tol).numpy()


def parse_patch_spec(spec: str) -> PatchArtifact:
    """``NAME=PATH@ROW,COL`` -> ``PatchArtifact``; PATH is ``.npy`` (float ``[h, w]`` or ``[C, h, w]``,
    read without pickle) or an image (PNG etc., scaled to [0, 1], grayscale unless RGB)."""
    try:
        name, rest = spec.split("=", 1)
        path, pos = rest.rsplit("@", 1)
        row, col = (int(v) for v in pos.split(","))
    except ValueError:
        raise ConfigError(f"cannot parse patch {spec!r}; use NAME=PATH@ROW,COL (e.g. tag=tag.png@0,20)") from None
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"patch name {name!r} must be letters, digits, '-' or '_'")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"patch file not found: {p}")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"cannot read patch {p}: {exc}") from exc
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB" if im.mode in ("RGB", "RGBA") else "L"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read patch image {p}: {exc}") from exc
        arr = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or not np.isfinite(arr).all() or arr.size == 0:
        raise DataError(f"patch {p} must be a finite [h, w] or [C, h, w] array, got shape {arr.shape}")
    return PatchArtifact(name, arr, row, col)


def resolve_artifacts(names: list[str], patches: list[str] | None = None) -> list[ArtifactLike]:
    """Built-in artifacts by name plus parsed user patches (names must be unique)."""
    from hansgate.data.artifacts import get_artifact

    out: list[ArtifactLike] = [get_artifact(n) for n in names]
    out += [parse_patch_spec(s) for s in patches or []]
    seen = [a.name for a in out]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"artifact names must be unique, got {seen}")
    return out


class ArtifactTestConfig(BaseModel):
    """Thresholds of the known-artifact test and how many samples it uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip_threshold: float = Field(0.10, gt=0.0, le=1.0, description="flag at this prediction flip rate")
    accuracy_drop_threshold: float = Field(0.05, gt=0.0, le=1.0, description="flag at this accuracy drop")
    max_samples: int = Field(1000, ge=10, description="clean samples pasted per artifact")
    relevance_samples: int = Field(32, ge=0, description="samples whose LRP share inside the mask is measured")
    lrp_method: str = Field("lrp-epsilon-zplus-box", description="composite of the relevance share (see audit.attributions)")
    seed: int = 0


@dataclass
class ModelArtifactResult:
    """One model on one artifact: flip rate, accuracy drop, most flipped-to class, relevance share in the mask."""

    n: int
    flip_rate: float
    accuracy_clean: float
    accuracy_pasted: float
    accuracy_drop: float
    top_target: str | None
    top_target_share: float | None
    flagged: bool
    relevance_share: float | None = None
    relevance_share_n: int | None = None
    relevance_share_ratio: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The report's layout: relevance fields only where they were measured."""
        return {k: v for k, v in asdict(self).items() if v is not None or not k.startswith("relevance_share")}


@dataclass(frozen=True)
class ArtifactTcav:
    """TCAV of the artifact's concept on one torch model (filled in by the concept section)."""

    model: str
    significant_positive_classes: list[str]
    max_mean_score: float | None


@dataclass
class ArtifactResult:
    """Every model on one artifact, on ``n_clean`` samples that did not carry it."""

    localized: bool
    n_clean: int
    mask_area_share: float | None
    models: dict[str, ModelArtifactResult] = field(default_factory=dict)
    tcav: ArtifactTcav | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"localized": self.localized, "n_clean": self.n_clean,
                                  "mask_area_share": self.mask_area_share,
                                  "models": {m: r.as_dict() for m, r in self.models.items()}}
        if self.tcav is not None:
            out["tcav"] = asdict(self.tcav)
        return out


@dataclass(frozen=True)
class HeatmapFigure:
    """Input images ``[n, H, W]`` (first channel) and one row of maps ``[n, H, W]`` per model or method
    (for the artifact tests: the pasted images and each model's LRP heatmaps)."""

    images: np.ndarray
    rows: dict[str, np.ndarray]


@dataclass
class ArtifactTests:
    """The known-artifact test of every artifact against every model."""

    config: ArtifactTestConfig
    artifacts: dict[str, ArtifactResult]
    heatmaps: dict[str, HeatmapFigure]

    def as_dict(self) -> dict[str, object]:
        return {"config": self.config.model_dump(), "artifacts": {a: r.as_dict() for a, r in self.artifacts.items()}}


def artifact_prediction_test(predict: PredictFn, x_clean: np.ndarray, y: np.ndarray, x_pasted: np.ndarray,
                             classes: list[str], config: ArtifactTestConfig,
                             clean_pred: np.ndarray | None = None) -> ModelArtifactResult:
    """Flip rate, accuracy drop and most-flipped-to class of one model on clean vs pasted images
    (``clean_pred``: the model's predicted classes on ``x_clean`` when already known)."""
    p0 = predict(x_clean).argmax(1) if clean_pred is None else np.asarray(clean_pred)
    p1 = predict(x_pasted).argmax(1)
    flips = p0 != p1
    acc0, acc1 = float((p0 == y).mean()), float((p1 == y).mean())
    flip_rate = float(flips.mean())
    target, target_share = None, None
    if flips.any():
        counts = np.bincount(p1[flips], minlength=len(classes))
        target, target_share = classes[int(counts.argmax())], float(counts.max() / flips.sum())
    drop = acc0 - acc1
    return ModelArtifactResult(
        n=int(len(y)), flip_rate=flip_rate, accuracy_clean=acc0, accuracy_pasted=acc1, accuracy_drop=drop,
        top_target=target, top_target_share=target_share,
        flagged=bool(flip_rate >= config.flip_threshold or drop >= config.accuracy_drop_threshold))


def known_artifact_tests(predictors: dict[str, PredictFn], torch_models: dict[str, nn.Module], x: torch.Tensor,
                         y: torch.Tensor, classes: list[str], artifacts: list[ArtifactLike],
                         config: ArtifactTestConfig,
                         clean_preds: dict[str, np.ndarray] | None = None) -> ArtifactTests:
    """Run every artifact against every model.

    ``predictors``: ``{model: numpy [N, C, H, W] -> logits [N, K]}`` (ONNX or torch) on raw pixels;
    ``torch_models``: the subset with a torch module taking raw pixels, for the relevance share (LRP,
    ``config.lrp_method``); ``x`` ``[N, C, H, W]`` / ``y`` ``[N]`` torch tensors;
    ``clean_preds``: ``{model: predicted classes [N] on x}`` to skip predicting the clean samples again.
    """
    from hansgate.audit.attributions import attribute, relevance_share_in_mask

    gen = np.random.default_rng(config.seed)
    results: dict[str, ArtifactResult] = {}
    heatmaps: dict[str, HeatmapFigure] = {}
    for art in artifacts:
        clean = ~carries(x, art)
        idx = np.flatnonzero(clean)
        if len(idx) > config.max_samples:
            idx = np.sort(gen.choice(idx, config.max_samples, replace=False))
        if len(idx) == 0:
            raise DataError(f"every sample already carries artifact {art.name!r}; no clean samples to paste it on")
        xc = x[torch.as_tensor(idx)]
        yc = y[torch.as_tensor(idx)]
        xp = art.apply(xc)
        h, w = x.shape[-2:]
        mask = art.mask(h, w)
        entry = ArtifactResult(localized=bool(art.localized), n_clean=int(len(idx)),
                               mask_area_share=float(mask.mean()) if art.localized else None)
        for model, predict in predictors.items():
            known = None if clean_preds is None or model not in clean_preds else clean_preds[model][idx]
            res = artifact_prediction_test(predict, xc.numpy(), yc.numpy(), xp.numpy(), classes, config, known)
            if model in torch_models and art.localized and config.relevance_samples:
                sub = xp[: config.relevance_samples]
                net = torch_models[model]
                with torch.no_grad():
                    pred = net(sub).argmax(1)
                rel = attribute(net, sub, pred, config.lrp_method)
                share = relevance_share_in_mask(rel, mask)
                res.relevance_share = float(share.mean())
                res.relevance_share_n = int(len(sub))
                res.relevance_share_ratio = float(share.mean() / max(float(mask.mean()), 1e-12))
                heatmaps.setdefault(art.name, HeatmapFigure(sub[:4, 0].numpy(), {}))
                heatmaps[art.name].rows[model] = rel[:4].sum(1).numpy()
            entry.models[model] = res
        results[art.name] = entry
    return ArtifactTests(config, results, heatmaps)
