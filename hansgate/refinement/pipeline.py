"""One path from files to a bundle for every method: load -> verify -> fit -> evaluate -> hash -> bundle.

``hansgate refine``, ``hansgate train`` and the demo share it:

1. **load** (``load_inputs``): the data, evaluation splits and concepts, read with one set
   of ``DataOptions`` (``--channels``, ``--image-size``, ``--mean/--std``; ImageFolder or
   ``.npz``; concepts from ``.npz`` or two ImageFolders). Every image is a raw pixel in
   [0, 1] of one shape; the model sees ``(x - mean) / std``. The data and evaluation splits
   stay on disk (``data.streaming.LazyImages``, ``stream=True``): every pass below reads
   them in batches, and subsets (calibration hold-out, verified set) are index sets.
2. **verify**: pruning and concept methods keep the samples the model predicts correctly
   (paper 000, Supp. F.1); XS methods train on all (``Refiner.verifies``). The guards
   (``refinement.guards``) refuse data with a low verified share or near-chance accuracy
   and warn when the pixels contradict the declared normalisation.
3. **fit**: the method from ``refinement.registry``; watched concepts are fitted on the
   refined model (``refinement.concept_heads``).
4. **evaluate**: accuracy before and after on every split given; post-hoc calibration
   (``hansgate.calibration``: temperature or vector scaling, chosen by cross-validation on the
   hold-out) fitted on a held-out share of the labelled data, taken before verification so
   that it holds the model's mistakes too (verified samples are all right, and would drive
   the temperature towards zero).
5. **hash**: the source model's identity, ``nn.models.source_sha256`` (the audit checks the same).
6. **bundle** (``build_bundle``): the normalisation is baked into the exported graph
   (``nn.normalisation.Normalised``) whenever it is not the identity, so every bundle takes
   the raw pixels its manifest declares; the export is checked against torch and written
   once, atomically.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import hansgate
from hansgate.bundle import Bundle, sha256_file, write_bundle
from hansgate.data.datasets import LabelledImages, LazyLabelled, load_labelled, open_labelled
from hansgate.data.streaming import LazyImages
from hansgate.errors import ConfigError, DataError
from hansgate.files import to_jsonable
from hansgate.manifest import (
    CalibrationSpec,
    ConceptSpec,
    Evaluation,
    GraphOutput,
    GraphSpec,
    InputSpec,
    Manifest,
    MethodSpec,
    SourceModel,
    SubgroupAttribute,
)
from hansgate.nn.export import OPSET, export_checked_to
from hansgate.nn.models import load_model, source_sha256
from hansgate.nn.normalisation import Normalised
from hansgate.nn.training import accuracy, predict_logits
from hansgate.nn.units import refined_weights
from hansgate.calibration import CalibrationFit, fit_calibration
from hansgate.refinement.clarc import ConceptData
from hansgate.refinement.concept_heads import ConceptHeads, watch_concept
from hansgate.refinement.concept_refine import load_concept
from hansgate.refinement.guards import GuardConfig, check_verified, pixel_warnings
from hansgate.refinement.streamed import Images, Log, in_memory, select, stream_accuracy, stream_logits
from hansgate.refinement.methods import RefinementResult
from hansgate.refinement.refiners import RefineData, Refiner, RefinerConfig
from hansgate.refinement.registry import get_refiner

__all__ = ["DataOptions", "Inputs", "Images", "verified_subset", "per_class_subset", "calibration_split", "calibration_spec",
           "load_inputs", "stream_logits", "bundle_graph", "build_bundle", "refine", "refine_from_files"]

#: The pixel range every bundle declares (``InputSpec.value_range``): raw pixels scaled to [0, 1].
VALUE_RANGE = (0.0, 1.0)
#: fewer held-out samples than this fit no temperature (the bundle then carries none)
MIN_CALIBRATION_SAMPLES = 20


class DataOptions(BaseModel):
    """How files become images: ImageFolder channels and size, the model's normalisation, class names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int = Field(1, ge=1)
    image_size: tuple[int, int] = (28, 28)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None

    def load(self, path: str | Path) -> LabelledImages:
        return load_labelled(path, channels=self.channels, size=self.image_size)

    def open(self, path: str | Path, log: Log | None = None) -> LazyLabelled:
        """Like ``load``, with the images left on disk and read in batches."""
        return open_labelled(path, channels=self.channels, size=self.image_size, log=log)


#: ``Inputs`` over tensors (``stream=False``, ``hansgate train``) or over lazy images
X = TypeVar("X", torch.Tensor, LazyImages, Images)


@dataclass
class Inputs(Generic[X]):
    """Everything read from files, in raw pixels: the pipeline's step 1.

    ``x``, ``y``: the refinement (or training) data; ``evaluation``: further labelled
    splits by the key their accuracy gets in the manifest; ``concepts`` by name; XS
    ``masks``/``mask_info``/``val``. ``mean``/``std``: the model's normalisation.
    """

    x: X
    y: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    description: str
    evaluation: dict[str, tuple[X, torch.Tensor]] = field(default_factory=dict)
    concepts: dict[str, ConceptData] = field(default_factory=dict)
    masks: torch.Tensor | None = None
    mask_info: dict[str, Any] = field(default_factory=dict)
    val: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def baked(self) -> bool:
        """Whether the exported graph normalises (anything but mean 0, std 1)."""
        return any(m != 0 for m in self.mean) or any(s != 1 for s in self.std)

    @overload
    def to_model(self, x: torch.Tensor) -> torch.Tensor: ...

    @overload
    def to_model(self, x: LazyImages) -> LazyImages: ...

    def to_model(self, x: Images) -> Images:
        """Raw pixels -> the model's input space, ``(x - mean) / std`` per channel (lazily for lazy images)."""
        if not self.baked:
            return x
        if isinstance(x, LazyImages):
            return x.normalised(self.mean, self.std)
        with torch.no_grad():
            return Normalised(nn.Identity(), self.mean, self.std)(x)

    def input_spec(self) -> InputSpec:
        c, h, w = self.shape
        return InputSpec(channels=c, height=h, width=w, value_range=VALUE_RANGE, mean=self.mean, std=self.std,
                         normalization_in_graph=self.baked, color_mode="L" if c == 1 else "RGB")

    def check(self) -> None:
        """One shape, raw pixels in [0, 1], labels inside the classes, a normalisation per channel."""
        c, h, w = self.shape
        if len(self.classes) < 2:
            raise DataError(f"need at least 2 classes, got {len(self.classes)}")
        if len(self.mean) != c or len(self.std) != c or any(not s > 0 for s in self.std):
            raise DataError(f"--mean/--std need {c} value(s) each (std > 0), got {len(self.mean)} and {len(self.std)}")
        parts: dict[str, tuple[Images, torch.Tensor]] = {"the data": (self.x, self.y)}
        parts |= {f"{k} data": v for k, v in self.evaluation.items()}
        parts |= {f"concept {n!r}": (cd.x, cd.y) for n, cd in self.concepts.items()}
        if self.val is not None:
            parts["validation data"] = self.val
        for what, (x, y) in parts.items():
            if tuple(x.shape[1:]) != (c, h, w):
                raise DataError(f"{what}: images {tuple(x.shape[1:])} differ from the data's {(c, h, w)}")
            if len(y) and int(y.max()) >= len(self.classes):
                raise DataError(f"{what}: labels go up to {int(y.max())} but {len(self.classes)} class name(s) "
                                "were given")
            lo, hi = (x.bounds() if isinstance(x, LazyImages) else (float(x.min()), float(x.max()))) if len(x) else (0, 1)
            if lo < VALUE_RANGE[0] - 1e-6 or hi > VALUE_RANGE[1] + 1e-6:
                raise DataError(f"{what}: pixel values span [{lo:.3g}, {hi:.3g}], outside "
                                f"[0, 1]; bundles take raw pixels in [0, 1]: pass unnormalised images and the "
                                "model's --mean/--std")


def load_inputs(data: str, options: DataOptions | None = None, *, test_data: str | None = None,
                poisoned_data: str | None = None, concepts: dict[str, str] | None = None, stream: bool = True,
                log: Log | None = None) -> Inputs[Images]:
    """Step 1 for ``hansgate refine``: the data, optional test/poisoned splits and concepts (``NAME: DATA``).

    ``stream``: the data and the test/poisoned splits stay on disk (``LazyImages``); concepts are read whole.
    """
    opts = options or DataOptions()
    ds: LabelledImages | LazyLabelled = opts.open(data, log) if stream else opts.load(data)
    names = list(opts.classes or ds.classes)
    c = int(ds.x.shape[1])
    size = (int(ds.x.shape[2]), int(ds.x.shape[3]))
    evaluation = {}
    for key, path in (("clean_acc", test_data), ("poisoned_acc", poisoned_data)):
        if path:
            extra: LabelledImages | LazyLabelled = opts.open(path, log) if stream else opts.load(path)
            evaluation[key] = (extra.x, extra.y)
    inputs = Inputs(ds.x, ds.y, names, list(opts.mean or [0.0] * c), list(opts.std or [1.0] * c),
                    f"verified: {data}; test: {test_data}; poisoned: {poisoned_data}", evaluation,
                    {name: load_concept(src, names, c, size) for name, src in (concepts or {}).items()})
    inputs.check()
    return inputs


def _verified(x: Images, y: torch.Tensor, keep: torch.Tensor) -> tuple[Images, torch.Tensor]:
    if int(keep.sum()) < 5:
        raise DataError(f"only {int(keep.sum())} of {len(y)} refinement samples are predicted correctly; "
                        "refinement needs verified samples the model gets right")
    idx = keep.nonzero().flatten()
    return select(x, idx), y[idx]


def verified_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples the model predicts correctly (paper 000, Supp. F.1: the user-verified set)."""
    keep = predict_logits(model, x).argmax(1) == y
    vx, vy = _verified(x, y, keep)
    assert isinstance(vx, torch.Tensor)
    return vx, vy


def per_class_subset(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``per_class`` samples of each class, drawn under ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    idx = []
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        idx.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    order = torch.cat(idx).sort().values
    return x[order], y[order]


def calibration_split(x: Images, y: torch.Tensor, share: float, seed: int
                      ) -> tuple[tuple[Images, torch.Tensor], tuple[Images, torch.Tensor] | None]:
    """``(kept, held_out)``: a seeded share of the labelled samples held out for calibration.

    ``held_out`` is ``None`` when the share would hold fewer than ``MIN_CALIBRATION_SAMPLES``;
    lazy images give index sets into the same files.
    """
    n_cal = int(round(share * len(y)))
    if n_cal < MIN_CALIBRATION_SAMPLES or len(y) - n_cal < MIN_CALIBRATION_SAMPLES:
        return (x, y), None
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:n_cal].sort().values, order[n_cal:].sort().values
    return (select(x, kept), y[kept]), (select(x, held), y[held])


def calibration_spec(model: nn.Module, x: Images, y: torch.Tensor, fit: CalibrationFit | None = None
                     ) -> CalibrationSpec:
    """The calibration of ``model`` on held-out ``x`` (model space), ``y`` as the manifest records it:
    ``fit``'s family (default: temperature or vector scaling, whichever cross-validates better)."""
    f = fit or CalibrationFit()
    c = fit_calibration(stream_logits(model, x).double().numpy(), y.numpy(), f.family, f.objective,
                        folds=min(f.folds, len(y)))
    return c.as_spec()


def bundle_graph(model: nn.Module, concepts: ConceptHeads | None = None) -> tuple[nn.Module, list[str]]:
    """The module to export (before normalisation) and its output names; heads added by ``concepts``."""
    if concepts is None:
        return model, ["logits"]
    return concepts.graph(model), ["logits", "concept_scores", "concept_sensitivity"]


def build_bundle(
    out: str | Path,
    result: RefinementResult,
    *,
    x_check: torch.Tensor,
    classes: list[str],
    input_spec: InputSpec,
    source: SourceModel,
    evaluation: Evaluation | None = None,
    subgroups: list[SubgroupAttribute] | None = None,
    concepts: ConceptHeads | None = None,
    concept_specs: list[ConceptSpec] | None = None,
    calibration: CalibrationSpec | None = None,
    verified_share: float | None = None,
    overwrite: bool = False,
    signing_key: Any = None,
) -> Bundle:
    """Export ``result.model`` with ``input_spec``'s normalisation baked in, check it, write the bundle atomically.

    ``x_check`` are raw pixels as the bundle takes them. When ``input_spec``'s mean/std are
    not the identity, the graph is ``Normalised(graph, mean, std)`` and the manifest says
    ``normalization_in_graph``; the concept heads are checked against autograd on the
    normalised samples the model itself sees. The refined torch module travels too
    (``refined.safetensors`` and ``manifest.refined``, rebuilt once here as a check), so the
    audit can explain the served model. ``verified_share``: the share of the refinement data
    the source model predicted correctly (``Manifest.verified_share``). ``signing_key``: an
    Ed25519 private key (or its file) that signs the bundle inside the same atomic write.
    """
    graph, names = bundle_graph(result.model, concepts)
    baked = any(m != 0 for m in input_spec.mean) or any(s != 1 for s in input_spec.std)
    norm = Normalised(nn.Identity(), input_spec.mean, input_spec.std) if baked else None
    if norm is not None:
        graph = Normalised(graph, input_spec.mean, input_spec.std)
    input_spec = input_spec.model_copy(update={"normalization_in_graph": baked})
    # the graph stays a file until the bundle's atomic write copies it: a large model's serialized weights
    # are never in memory beside the model and its refined.safetensors bytes
    with tempfile.TemporaryDirectory(prefix="hansgate-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        diff = export_checked_to(onnx_path, graph.eval(), x_check, names)
        x_seen = x_check if concepts is not None else x_check[:8]  # the refined-weights check reads 8
        with torch.no_grad():
            x_model = norm(x_seen) if norm is not None else x_seen
        if concepts is not None:  # the heads' sensitivity must match autograd (refinement.concept_heads)
            concepts.check(onnx_path, result.model, x_check, x_model=x_model)
            concept_specs = concept_specs if concept_specs is not None else concepts.specs()
        refined = refined_weights(result.model, x_model[:8])
        k, m = len(classes), len(concept_specs or [])
        shapes: dict[str, list[int | None]] = {"logits": [None, k], "concept_scores": [None, m],
                                               "concept_sensitivity": [None, m, k]}
        manifest = Manifest(
            hansgate_version=hansgate.__version__,
            classes=classes,
            input=input_spec,
            source_model=source,
            method=MethodSpec(name=result.method, layers=result.layers, hyperparameters=to_jsonable(result.hyperparameters)
                              | {"selection": to_jsonable(result.selection.as_dict())}, seed=None),
            evaluation=evaluation,
            concepts=concept_specs or [],
            subgroups=subgroups or [],
            calibration=calibration,
            verified_share=verified_share,
            refined=refined[1] if refined is not None else None,
            graph=GraphSpec(sha256=sha256_file(onnx_path), opset=OPSET,
                            outputs=[GraphOutput(name=n, shape=shapes[n]) for n in names], max_abs_logit_diff=diff),
        )
        extra = {refined[1].file: refined[0]} if refined is not None else None
        return write_bundle(out, onnx_path, manifest, overwrite=overwrite, extra_files=extra, signing_key=signing_key)


def _scores(model: nn.Module, inputs: Inputs[Any], x: Images, y: torch.Tensor, train_key: str) -> dict[str, float]:
    out = {train_key: stream_accuracy(model, x, y)}
    for key, (ex, ey) in inputs.evaluation.items():
        out[key] = stream_accuracy(model, inputs.to_model(ex), ey)
    if "acc_contaminated" in out and "acc_permuted" in out:
        out["delta"] = out["acc_contaminated"] - out["acc_permuted"]
    return out


def _pixel_check(inputs: Inputs[Any], guards: GuardConfig) -> list[str]:
    """``guards.pixel_warnings`` on a seeded sample of at most 256 refinement images."""
    x = inputs.x
    raw = x.sample(256) if isinstance(x, LazyImages) else x[torch.randperm(len(x), generator=torch.Generator()
                                                                           .manual_seed(0))[:256]]
    model_space = inputs.to_model(raw)
    assert isinstance(model_space, torch.Tensor)
    return pixel_warnings(raw, model_space, inputs.baked, guards)


def refine(refiner: Refiner | str, inputs: Inputs[Any], *, model_spec: str, weights: str | None, out: str | Path,
           config: RefinerConfig | None = None, overwrite: bool = False, progress: bool = False,
           log: Log | None = None, calibration_share: float = 0.2, guards: GuardConfig | None = None,
           signing_key: str | Path | None = None,
           calibration_fit: CalibrationFit | None = None) -> tuple[Bundle, dict[str, Any]]:
    """Steps 2-6 (module docstring) for any registered method; returns the bundle and a JSON-able summary.

    ``calibration_share`` of the labelled data is held out for calibration (0 fits none), fitted as
    ``calibration_fit`` says.
    ``guards``: the refusals and warnings of ``refinement.guards`` (warnings go to ``log``).
    ``signing_key``: an Ed25519 private key file; the bundle is signed right after it is written
    and checked against the key's public half.
    """
    refiner = get_refiner(refiner) if isinstance(refiner, str) else refiner
    cfg = config or RefinerConfig()
    say = log or (lambda msg: None)
    guard_cfg = guards or GuardConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"output {out} exists; pass --overwrite to replace it")
    if refiner.needs_concept and not inputs.concepts:
        raise ConfigError(f"--method {refiner.name} needs at least one --concept NAME=DATA")
    key = None
    if signing_key is not None:
        from hansgate.signing import load_private_key

        key = load_private_key(signing_key)  # a bad key fails before any work
    c, h, _ = inputs.shape
    torch.manual_seed(refiner.seed(cfg))  # the initialisation of a built-in without weights
    model = load_model(model_spec, weights, num_classes=len(inputs.classes), in_channels=c, image_size=h)
    head = inputs.to_model(inputs.x)[:2]
    if (k_out := predict_logits(model, torch.as_tensor(head)).shape[1]) != len(inputs.classes):
        raise DataError(f"the model has {k_out} outputs but the data have {len(inputs.classes)} classes")
    for warning in _pixel_check(inputs, guard_cfg):
        say(warning)
    (x_all, y_all), held_out = calibration_split(inputs.to_model(inputs.x), inputs.y, calibration_share,
                                                 refiner.seed(cfg))
    verified_share = None
    if refiner.verifies:
        keep = stream_logits(model, x_all, progress=progress, desc="verify").argmax(1) == y_all
        verified_share = float(keep.float().mean())
        for warning in check_verified(int(keep.sum()), len(keep), len(inputs.classes), guard_cfg):
            say(warning)
        x, y = _verified(x_all, y_all, keep)
    else:
        x, y = x_all, y_all
    if isinstance(x, LazyImages):
        x.batch_limit = max(x.batch_limit, cfg.refine.batch_size)  # batches drawn by index stay tensors
    concepts = {n: ConceptData(inputs.to_model(torch.as_tensor(cd.x)), cd.y, cd.concept) for n, cd in inputs.concepts.items()}
    val = (inputs.to_model(inputs.val[0]), inputs.val[1]) if inputs.val is not None else None
    data = RefineData(x, y, inputs.classes, concepts, inputs.masks, inputs.mask_info, val)  # type: ignore[arg-type]
    result = refiner.fit(model, data, cfg, progress=progress, log=say)
    layer = cfg.clarc.layer  # None: the automatic watch layer (a nonlinearity before the logits)
    watched = []
    if concepts:
        x_watch = in_memory(x, say, "watched concepts read every verified sample")
        watched = [watch_concept(result.model, n, cd.x[~cd.concept], cd.x[cd.concept], x_watch, y, inputs.classes,
                                 layer=layer, kind=cfg.clarc.cav_kind, pooling=cfg.clarc.pooling,
                                 seed=cfg.clarc.seed) for n, cd in concepts.items()]
    train_key = "verified_acc" if refiner.verifies else "train_acc"
    evaluation = Evaluation(data=inputs.description, before=_scores(model, inputs, x, y, train_key),
                            after=_scores(result.model, inputs, x, y, train_key))
    source = SourceModel(spec=model_spec, sha256=source_sha256(model_spec, weights, model),
                         weights=str(weights) if weights else None)
    del model  # the source's weights are not needed for the bundle: one copy fewer while it is exported
    calibration = calibration_spec(result.model, *held_out, calibration_fit) if held_out is not None else None
    x_check = inputs.x[:256]
    assert isinstance(x_check, torch.Tensor)
    bundle = build_bundle(out, result, x_check=x_check, classes=inputs.classes,
                          input_spec=inputs.input_spec(), source=source, evaluation=evaluation,
                          concepts=ConceptHeads(watched) if watched else None, calibration=calibration,
                          verified_share=verified_share, overwrite=overwrite, signing_key=key)
    summary = {"method": result.method, "layers": result.layers, "before": evaluation.before,
               "after": evaluation.after, "n_data": len(inputs.y), ("n_verified" if refiner.verifies else "n_train"): len(y),
               "verified_share": verified_share, "signed_by": bundle.signed_by,
               "concepts": [w.name for w in watched], "hyperparameters": to_jsonable(result.hyperparameters),
               "selection": to_jsonable(result.selection.as_dict()), "timings": result.timings,
               "calibration": calibration.model_dump() if calibration is not None else None}
    return bundle, summary


def refine_from_files(*, model_spec: str, weights: str | None, data: str, out: str | Path,
                      method: str = "pca-egem", config: RefinerConfig | None = None,
                      options: DataOptions | None = None, test_data: str | None = None,
                      poisoned_data: str | None = None, concepts: dict[str, str] | None = None,
                      overwrite: bool = False, progress: bool = False,
                      calibration_share: float = 0.2, guards: GuardConfig | None = None,
                      signing_key: str | Path | None = None, stream: bool = True,
                      log: Log | None = None, calibration_fit: CalibrationFit | None = None
                      ) -> tuple[Bundle, dict[str, Any]]:
    """``hansgate refine``: every step from files to the bundle, for any pruning or concept method."""
    refiner = get_refiner(method, "pruning", "concept")
    inputs = load_inputs(data, options, test_data=test_data, poisoned_data=poisoned_data, concepts=concepts,
                         stream=stream, log=log)
    return refine(refiner, inputs, model_spec=model_spec, weights=weights, out=out, config=config,
                  overwrite=overwrite, progress=progress, calibration_share=calibration_share, guards=guards,
                  signing_key=signing_key, log=log, calibration_fit=calibration_fit)
