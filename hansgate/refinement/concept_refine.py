"""``hansgate refine`` with concepts: ClArC correction and/or watched concept heads in the bundle.

Concept data (``--concept NAME=PATH``) is an ``.npz`` with

- ``x`` float32 ``[N, C, H, W]``, the same pixel scale as ``--data``;
- ``y`` int ``[N]``, class labels (used for RR-ClArC's validation and A-ClArC);
- ``concept`` bool ``[N]``: True where the sample carries the concept (e.g. the same
  images with and without a hospital tag). At least 4 of each.

``--method p-clarc|a-clarc|rr-clarc`` corrects the model for the *first* concept
(``refinement.clarc``); with any method every concept given is registered as a watched
concept, so ``model.onnx`` carries ``concept_scores``/``concept_sensitivity`` heads for
all of them (``refinement.concept_heads``); the CAVs are fitted on the refined model.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hansgate.bundle import Bundle
from hansgate.errors import ConfigError, DataError
from hansgate.manifest import Evaluation, InputSpec, SourceModel
from hansgate.refinement.clarc import (
    CLARC_METHODS,
    ClarcConfig,
    ConceptData,
    refine_clarc,
)
from hansgate.refinement.concept_heads import ConceptHeads, watch_concept
from hansgate.refinement.methods import RefineConfig, RefinementResult, refine_model
from hansgate.refinement.selection import Candidate, SlackSelection

__all__ = ["load_concept_data", "parse_concept_args", "clarc_as_result", "refine_with_concepts"]


def load_concept_data(path: str | Path) -> ConceptData:
    """Read concept data (module docstring) without unpickling; ``DataError`` with one reason otherwise."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".npz":
        raise DataError(f"concept data must be an existing .npz file, got {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = {"x", "y", "concept"} - set(z.files)
            if missing:
                raise DataError(f"{p} lacks array(s) {sorted(missing)} (needs x, y, concept)")
            x, y, c = z["x"], z["y"], z["concept"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {p} as .npz: {exc}") from exc
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise DataError(f"{p}: 'x' must be finite float [N, C, H, W], got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{p}: 'y' must be {len(x)} non-negative integers, got {y.dtype} {y.shape}")
    if c.shape != (len(x),) or c.dtype != np.bool_:
        raise DataError(f"{p}: 'concept' must be {len(x)} booleans, got {c.dtype} {c.shape}")
    return ConceptData(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)),
                       torch.from_numpy(c))


def parse_concept_args(items: list[str] | None) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> ``{NAME: PATH}`` (names unique, manifest-safe)."""
    import re

    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"--concept needs NAME=PATH with NAME of letters, digits, '_', '.', '-': {item!r}")
        if name in out:
            raise ConfigError(f"concept {name!r} given twice")
        out[name] = path
    return out


def clarc_as_result(res: Any) -> RefinementResult:
    """A ``ClarcResult`` in the shape bundles record (``RefinementResult`` with its selection table)."""
    hp = res.hyperparameters
    if res.candidates:
        cands = [Candidate({"lambda": c["lambda"]}, c["val_balanced_acc"]) for c in res.candidates]
        chosen = next(c for c in cands if c.params["lambda"] == hp["lambda"])
    else:
        chosen = Candidate({}, hp["val_balanced_acc_refined"])
        cands = [chosen]
    selection = SlackSelection(chosen, hp["val_balanced_acc_original"], 0.0, chosen.val_acc, cands,
                               qualified=chosen.val_acc >= hp["val_balanced_acc_original"])
    clean_hp = {k: v for k, v in hp.items() if k != "cav"} | {"cav_evidence": hp["cav"]}
    return RefinementResult(res.model, res.method, [res.layer], clean_hp, selection, dict(res.timings))


def refine_with_concepts(*, model_spec: str, weights: str | None, data: str, out: str | Path,
                         concepts: dict[str, str], method: str, clarc: ClarcConfig,
                         refine: RefineConfig | None = None, classes: list[str] | None = None,
                         test_data: str | None = None, poisoned_data: str | None = None,
                         overwrite: bool = False, progress: bool = False) -> tuple[Bundle, dict[str, Any]]:
    """Load, refine (ClArC or a ``refinement.methods`` method), watch the concepts, write the bundle."""
    from hansgate.bundle import sha256_file
    from hansgate.data.datasets import load_labelled
    from hansgate.nn.models import load_model, state_dict_sha256
    from hansgate.nn.training import accuracy
    from hansgate.refinement.pipeline import build_bundle, verified_subset

    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"output {out} exists; pass --overwrite to replace it")
    if method in CLARC_METHODS and not concepts:
        raise ConfigError(f"--method {method} needs at least one --concept NAME=DATA")
    concept_data = {name: load_concept_data(path) for name, path in concepts.items()}
    ds = load_labelled(data)
    names = classes or ds.classes
    c, h, w = ds.x.shape[1:]
    for name, cd in concept_data.items():
        if tuple(cd.x.shape[1:]) != (c, h, w):
            raise DataError(f"concept {name!r}: images {tuple(cd.x.shape[1:])} differ from the data's {(c, h, w)}")
        if int(cd.y.max()) >= len(names):
            raise DataError(f"concept {name!r}: labels go up to {int(cd.y.max())}, but there are {len(names)} classes")
    model = load_model(model_spec, weights, num_classes=len(names), in_channels=c, image_size=h)
    x, y = verified_subset(model, ds.x, ds.y)
    if method in CLARC_METHODS:
        first = next(iter(concept_data))
        result = clarc_as_result(refine_clarc(model, x, y, concept_data[first],
                                              clarc.model_copy(update={"method": method})))
    else:
        result = refine_model(model, x, y, (refine or RefineConfig()).model_copy(update={"method": method}),
                              progress=progress)
    watched = []
    for name, cd in concept_data.items():
        watched.append(watch_concept(result.model, name, cd.x[~cd.concept], cd.x[cd.concept], x, y, names,
                                     layer=clarc.layer if method not in CLARC_METHODS else result.layers[0],
                                     kind=clarc.cav_kind, pooling=clarc.pooling, seed=clarc.seed))

    def scores(m: torch.nn.Module) -> dict[str, float]:
        s = {"verified_acc": accuracy(m, x, y)}
        for key, path in (("clean_acc", test_data), ("poisoned_acc", poisoned_data)):
            if path:
                extra = load_labelled(path)
                s[key] = accuracy(m, extra.x, extra.y)
        return s

    evaluation = Evaluation(data=f"verified: {data}; test: {test_data}; poisoned: {poisoned_data}",
                            before=scores(model), after=scores(result.model))
    source_hash = sha256_file(weights) if weights else state_dict_sha256(model)
    bundle = build_bundle(
        out, result, x_check=x[:256], classes=names,
        input_spec=InputSpec(channels=c, height=h, width=w, mean=[0.0] * c, std=[1.0] * c,
                             color_mode="L" if c == 1 else "RGB"),
        source=SourceModel(spec=model_spec, sha256=source_hash, weights=str(weights) if weights else None),
        evaluation=evaluation, concepts=ConceptHeads(watched) if watched else None, overwrite=overwrite)
    return bundle, {"before": evaluation.before, "after": evaluation.after, "n_verified": len(y),
                    "method": result.method, "concepts": [wc.name for wc in watched],
                    "hyperparameters": result.hyperparameters}
