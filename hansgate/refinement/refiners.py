"""The refiners behind ``refinement.registry``: one ``fit(model, data, config)`` per method.

Three families share the protocol (``Refiner``):

- ``pruning`` — EGEM, PCA-EGEM (paper 000), RGEM, ridge and retraining
  (``refinement.methods``): hyper-parameter by the slack rule on the verified samples;
- ``concept`` — P-, A- and RR-ClArC (paper 001, ``refinement.clarc.refine_clarc``): the
  first concept of ``data.concepts`` is corrected;
- ``xs`` — training with explanatory supervision, ``CE + lambda L_XS`` (paper 002 Eq. 3;
  ``rrr``, ``rbr``, ``tap`` of paper 004 and ``none``, plain cross-entropy, as the
  baseline; ``refinement.xs.train_xs``): lambda fixed or chosen by the lowest
  cross-entropy on validation data whose spurious signal is permuted (paper 002).

Pruning and concept methods run on verified samples (what the model gets right,
paper 000 Supp. F.1); XS methods train on all of their training data (``verifies``).
EGEM, PCA-EGEM, RGEM and ridge read images in batches and take ``data.streaming.LazyImages``
as they come (``streams``); the other methods train on every sample in every epoch and read
lazy images into memory first, saying so through ``log``.
``refinement.registry`` maps every name to one of these classes.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hansgate.data.streaming import LazyImages
from hansgate.errors import ConfigError, DataError
from hansgate.nn.hooks import eval_mode
from hansgate.nn.training import accuracy, predict_logits
from hansgate.refinement.clarc import ClarcConfig, ClarcResult, ConceptData, refine_clarc
from hansgate.refinement.methods import RefineConfig, RefinementResult, refine_model
from hansgate.refinement.registry import Entry, Family
from hansgate.refinement.selection import Candidate, RuleSelection, select_best
from hansgate.refinement.streamed import Images, in_memory
from hansgate.refinement.xs import XSConfig, tap_layers, train_xs

__all__ = ["RefineData", "TrainXSConfig", "RefinerConfig", "Refiner", "PruningRefiner", "ClarcRefiner", "XSRefiner",
           "clarc_result"]

Log = Callable[[str], None]
#: pruning methods that read their data in batches (everything else holds it in memory)
STREAMING = frozenset({"egem", "pca-egem", "rgem", "ridge"})


class TrainXSConfig(BaseModel):
    """Options of the XS family (``hansgate train``); ``xs`` holds the training hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    xs: XSConfig = XSConfig()
    lambdas: tuple[float, ...] | None = Field(None, description="candidates to tune on permuted validation data")
    teacher_share: float | None = Field(None, gt=0, le=1)
    teacher_tau: float = Field(0.01, gt=0, le=1)
    teacher_epochs: int = Field(30, ge=1)
    teacher_model: str = "mnist_cnn"
    n_train: int | None = Field(None, ge=2, description="decoy data only: training images to use")


class RefinerConfig(BaseModel):
    """Every family's options; a refiner reads its own part (``refine``, ``clarc`` or ``xs``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    refine: RefineConfig = RefineConfig()
    clarc: ClarcConfig = ClarcConfig()
    xs: TrainXSConfig = TrainXSConfig()


@dataclass
class RefineData:
    """What a refiner works on, already in the model's input space (normalised when the model expects it).

    ``x`` ``[N, C, H, W]``, ``y`` ``[N]``: verified samples (pruning, concept) or training
    data (xs). ``concepts``: labelled concept samples by name (ClArC corrects the first).
    ``masks`` ``[N, 1, H, W]`` (1 = pixels not to use) and ``mask_info`` for XS; ``val``:
    XS validation data with the spurious signal permuted, for tuning lambda.
    """

    x: Images
    y: torch.Tensor
    classes: list[str]
    concepts: dict[str, ConceptData] = field(default_factory=dict)
    masks: torch.Tensor | None = None
    mask_info: dict[str, Any] = field(default_factory=dict)
    val: tuple[torch.Tensor, torch.Tensor] | None = None


class Refiner(ABC):
    """A refinement method by name. ``fit`` never changes the caller's model or its train/eval mode.

    ``verifies``: runs on the verified samples (else on all training data);
    ``needs_concept``: refuses data without concepts; ``streams``: takes lazy images as they are.
    """

    family: Family
    verifies: bool = True
    needs_concept: bool = False
    streams: bool = False

    def __init__(self, entry: Entry) -> None:
        if entry.family != self.family:
            raise ConfigError(f"{type(self).__name__} implements the {self.family} family, not {entry.family}")
        self.name = entry.name
        self.summary = entry.summary

    def fit(self, model: nn.Module, data: RefineData, config: RefinerConfig | None = None, *,
            progress: bool = False, log: Log | None = None) -> RefinementResult:
        """Refine ``model`` on ``data`` with ``config``; the result's model is a new module in eval mode."""
        if len(data.x) != len(data.y) or len(data.y) < 2:
            raise DataError(f"need labelled samples, got {len(data.x)} images and {len(data.y)} labels")
        if self.needs_concept and not data.concepts:
            raise ConfigError(f"--method {self.name} needs at least one --concept NAME=DATA")
        say = log or (lambda msg: None)
        if isinstance(data.x, LazyImages) and not self.streams:
            data = replace(data, x=in_memory(data.x, say, f"--method {self.name} trains on every sample"))
        with eval_mode(model):
            return self._fit(model, data, config or RefinerConfig(), progress, say)

    def seed(self, config: RefinerConfig) -> int:
        """The seed this method's options carry (also seeds a built-in model's initialisation)."""
        return config.refine.seed

    @abstractmethod
    def _fit(self, model: nn.Module, data: RefineData, config: RefinerConfig, progress: bool,
             log: Log) -> RefinementResult: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class PruningRefiner(Refiner):
    """A ``refinement.methods`` entry: ``refine_model`` with ``config.refine`` and this method."""

    family: Family = "pruning"

    def __init__(self, entry: Entry) -> None:
        super().__init__(entry)
        self.streams = self.name in STREAMING

    def _fit(self, model: nn.Module, data: RefineData, config: RefinerConfig, progress: bool,
             log: Log) -> RefinementResult:
        # LazyImages index like a tensor: slices and batch-sized index sets read images, larger sets stay lazy
        return refine_model(model, data.x, data.y,  # type: ignore[arg-type]
                            config.refine.model_copy(update={"method": self.name}), progress)


class ClarcRefiner(Refiner):
    """``refine_clarc`` for the first concept; lambda (RR-ClArC) by balanced accuracy on held-out concept data."""

    family: Family = "concept"
    needs_concept = True

    def seed(self, config: RefinerConfig) -> int:
        return config.clarc.seed

    def _fit(self, model: nn.Module, data: RefineData, config: RefinerConfig, progress: bool,
             log: Log) -> RefinementResult:
        concept = next(iter(data.concepts.values()))
        assert isinstance(data.x, torch.Tensor)  # read into memory by fit()
        res = refine_clarc(model, data.x, data.y, concept, config.clarc.model_copy(update={"method": self.name}))
        return clarc_result(res)


def clarc_result(res: ClarcResult) -> RefinementResult:
    """A ``ClarcResult`` as a ``RefinementResult``: RR-ClArC's lambda table as a ``RuleSelection``."""
    hp = dict(res.hyperparameters)
    if res.candidates:
        cands = [Candidate({"lambda": c["lambda"]}, c["val_balanced_acc"]) for c in res.candidates]
        chosen = next(c for c in cands if c.params["lambda"] == hp["lambda"])
        rule = str(hp.get("selection", "max balanced accuracy on held-out concept data"))
        details = [{k: v for k, v in c.items() if k not in ("lambda", "val_balanced_acc")} for c in res.candidates]
    else:
        chosen = Candidate({}, hp["val_balanced_acc_refined"])
        cands, rule, details = [chosen], "none (no hyper-parameter to choose)", []
    selection = RuleSelection(chosen, cands, rule, details=details,
                              original_val_acc=hp["val_balanced_acc_original"])
    clean_hp = {k: v for k, v in hp.items() if k not in ("cav", "selection")} | {"cav_evidence": hp["cav"]}
    return RefinementResult(res.model, res.method, [res.layer], clean_hp, selection, dict(res.timings))


def _epoch_log(log: Log, lam: float) -> Callable[[int, dict[str, float]], None]:
    def report(epoch: int, parts: dict[str, float]) -> None:
        log(f"  lambda={lam:g} epoch {epoch + 1}: {parts}")

    return report


class XSRefiner(Refiner):
    """``train_xs`` from a copy of the model for each lambda candidate; the lowest validation cross-entropy wins."""

    family: Family = "xs"
    verifies = False

    def seed(self, config: RefinerConfig) -> int:
        return config.xs.xs.seed

    def _fit(self, model: nn.Module, data: RefineData, config: RefinerConfig, progress: bool,
             log: Log) -> RefinementResult:
        cfg = config.xs
        x = data.x
        assert isinstance(x, torch.Tensor)  # read into memory by fit()
        if cfg.lambdas and data.val is None:
            raise ConfigError("tuning lambda needs --val-data: validation images whose spurious signal is permuted")
        masks = data.masks if data.masks is not None else torch.zeros(len(data.y), 1, *x.shape[2:])
        xs_cfg = cfg.xs.model_copy(update={"method": self.name})
        lams = list(cfg.lambdas) if cfg.lambdas else [xs_cfg.lam]
        cands: list[Candidate] = []
        losses: list[float | None] = []
        trained: list[tuple[nn.Module, float]] = []
        for lam in lams:
            candidate = copy.deepcopy(model)
            t0 = time.perf_counter()
            train_xs(candidate, x, data.y, masks, xs_cfg.model_copy(update={"lam": lam}),
                     callback=_epoch_log(log, lam))
            trained.append((candidate, time.perf_counter() - t0))
            if data.val is not None:
                vx, vy = data.val
                losses.append(float(F.cross_entropy(predict_logits(candidate, vx), vy)))
                cands.append(Candidate({"lam": lam}, accuracy(candidate, vx, vy)))
            else:
                losses.append(None)
                cands.append(Candidate({"lam": lam}, accuracy(candidate, x, data.y)))
        rule = "min cross-entropy on permuted validation data (paper 002)" if cfg.lambdas else "fixed"
        selection = select_best(cands, losses, rule, best="min", score_name="val_loss")
        refined, secs = trained[next(i for i, c in enumerate(cands) if c is selection.chosen)]
        hp: dict[str, Any] = {"lam": selection.chosen.params["lam"], "epochs": xs_cfg.epochs, "lr": xs_cfg.lr,
                              "batch_size": xs_cfg.batch_size, "optimizer": "adam", "masks": data.mask_info}
        if self.name == "tap":
            hp |= {"tap_kernel": xs_cfg.tap_kernel, "tap_norm": xs_cfg.tap_norm}
        if self.name == "rbr":
            hp["inverse_hessian"] = "identity"
        layers = (xs_cfg.layers or tap_layers(refined)) if self.name == "tap" else []
        return RefinementResult(refined.eval(), self.name, layers, hp, selection, {"train_s": secs})
