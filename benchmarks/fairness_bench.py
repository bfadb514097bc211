"""Live fairness benchmark (issue 15): selection counts and calibrated label-free recall on the demo's deploy stream.

The demo configuration (embedded digits, seed 0, ``small_vgg`` trained on the biased split,
corner artifact on class 8, PCA-EGEM under the 5 % slack rule), with one addition: a calibration
split of held-out source digits (``calibration_share``; never in test or deploy), on which each
bundle's temperature is fitted. ``--calibration-data deployment`` (default) gives that split the
deployment's make-up, the artifact on a seeded ``site_b_share`` of it as at site B, so that it
represents the stream the estimate is made on; ``clean`` keeps it artifact-free (the first
version). ``--calibration-objective`` picks the fit (``hansgate.calibration``: ``brier`` by
default, ``nll``), ``--calibration-family`` the family: ``auto`` (default) lets grouped 5-fold
cross-validation on the calibration split alone choose between temperature scaling and vector
scaling at each ridge penalty (the two jittered copies of a source digit stay in one fold);
``temperature`` is the first version's single temperature. Two bundles are served — the third party's original model
and the PCA-EGEM refinement, each watching the artifact — through the gateway's ASGI app
in-process, and the deploy split is streamed with every row's ``site`` and ``stroke``:

1. ``selection``: ``/compliance``'s counts against the client's own tally from the responses
   (must be equal), and ``ratio_to_max`` against the client's computation;
2. ``estimated``: the label-free recall per subgroup and class, taken before any feedback;
   then feedback for every row (by receipt, attributes from the receipt) and the realized
   recall; the mean absolute difference over cells with at least ``min_positives`` labelled
   positives, for all such cells and for the cells the gateway marks trusted.
3. ``offline``: the same estimator recomputed from each model's logits (checked against the
   gateway's figures) for every calibration choice (clean or deployment-like split, NLL or
   Brier fit, temperature or the cross-validated family), vector scaling at every fixed penalty
   (the regularisation path, for reading, not for choosing), the served fit under other
   fold seeds, the noise floor (labels drawn from the calibrated probabilities themselves), a
   bound no temperature can beat: the best MAE over temperatures chosen *on the deploy stream
   itself* (an oracle, not a method), and per class the recall and the uncalibrated estimate on
   the calibration split and on the deploy stream by site (where the hold-out misjudges a class).

Usage: python benchmarks/fairness_bench.py --out benchmarks/results/fairness.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hansgate.calibration import PENALTIES, calibrated_probabilities, fit_calibration, fit_vector_scaling  # noqa: E402
from hansgate.data.digits import CleverHansConfig, make_clever_hans  # noqa: E402
from hansgate.manifest import InputSpec, SourceModel, SubgroupAttribute  # noqa: E402
from hansgate.nn.training import predict_logits  # noqa: E402
from hansgate.nn.models import state_dict_sha256  # noqa: E402
from hansgate.refinement.concept_heads import ConceptHeads, watch_concept  # noqa: E402
from hansgate.refinement.evaluation import BenchmarkConfig, train_demo_model  # noqa: E402
from hansgate.refinement.methods import RefineConfig, RefinementResult, refine_model  # noqa: E402
from hansgate.refinement.pipeline import build_bundle, per_class_subset, verified_subset  # noqa: E402
from hansgate.refinement.selection import Candidate, select_best  # noqa: E402
from hansgate.service.app import create_app  # noqa: E402
from hansgate.service.config import GatewayConfig  # noqa: E402
from hansgate.service.gateway import Gateway  # noqa: E402


def calibration_at_b(data: Any) -> torch.Tensor:
    """Which calibration images carry the artifact in the ``deployment`` split: a seeded ``site_b_share``."""
    gen = torch.Generator().manual_seed(data.config.seed + 1)
    return torch.rand(len(data.y_calib), generator=gen) < data.config.site_b_share


def calibration_sets(data: Any) -> dict[str, torch.Tensor]:
    """The calibration images: ``clean`` as drawn, ``deployment`` with the artifact on ``calibration_at_b``
    (the deploy stream's make-up; other digits than the deploy stream's)."""
    return {"clean": data.x_calib, "deployment": data.artifact.apply_where(data.x_calib, calibration_at_b(data))}


def source_groups(data: Any) -> np.ndarray:
    """The source digit of each calibration image (``test_copies`` jittered copies, tiled)."""
    return np.arange(len(data.y_calib)) % (len(data.y_calib) // data.config.test_copies)


def make_bundles(seed: int, calibration_share: float, calibration_data: str, objective: str, family: str, out: Path,
                 log: Any) -> tuple[Any, dict[str, Path], dict[str, dict[str, np.ndarray]]]:
    data = make_clever_hans(CleverHansConfig(seed=seed, calibration_share=calibration_share))
    original = train_demo_model(BenchmarkConfig(), data, seed)
    xr, yr = per_class_subset(*verified_subset(original, data.x_refine, data.y_refine), 200, seed)
    log(f"trained; {len(yr)} verified samples; {len(data.y_calib)} calibration images")
    refined = refine_model(original, xr, yr, RefineConfig(method="pca-egem", seed=seed))
    identity = RefinementResult(original, "none", [], {}, select_best([Candidate({}, 1.0)], [None], "identity", best="max"))
    spec = InputSpec(channels=1, height=28, width=28, mean=[0.0], std=[1.0], color_mode="L")
    subgroups = [SubgroupAttribute(name="site", values=["A", "B"]),
                 SubgroupAttribute(name="stroke", values=["thick", "thin"])]
    paths = {}
    logits: dict[str, dict[str, np.ndarray]] = {}
    sets = calibration_sets(data)
    for name, result in (("original", identity), ("pca-egem", refined)):
        watched = watch_concept(result.model, "corner", xr, data.artifact.apply(xr), xr, yr, data.classes,
                                pooling="none", seed=seed)
        logits[name] = {k: predict_logits(result.model, x).double().numpy() for k, x in sets.items()}
        logits[name]["deploy"] = predict_logits(result.model, data.x_deploy).double().numpy()
        calibration = fit_calibration(logits[name][calibration_data], data.y_calib.numpy(), family,  # type: ignore[arg-type]
                                      objective, groups=source_groups(data), seed=seed).as_spec()  # type: ignore[arg-type]
        log(f"{name}: {calibration.family} (penalty {calibration.penalty}), temperature {calibration.temperature:.3f}, "
            f"ECE {calibration.ece_before:.3f} -> {calibration.ece_after:.3f}")
        bundle = build_bundle(out / name, result, x_check=data.x_test[:256], classes=data.classes, input_spec=spec,
                              source=SourceModel(spec="builtin:small_vgg", sha256=state_dict_sha256(original)),
                              subgroups=subgroups, concepts=ConceptHeads([watched]), calibration=calibration)
        paths[name] = bundle.path
    return data, paths, logits


def cell_estimates(probs: np.ndarray, pred: np.ndarray, y: np.ndarray, attrs: dict[str, np.ndarray],
                   classes: list[str], min_positives: int) -> dict[tuple[str, str, str], tuple[float, float]]:
    """The gateway's estimator offline: per subgroup and class with >= ``min_positives`` positives,
    ``(tp_hat / (tp_hat + fn_hat), realized recall)``."""
    out = {}
    for attr, values in attrs.items():
        for v in np.unique(values):
            m = values == v
            for c in range(len(classes)):
                pos = m & (y == c)
                if pos.sum() < min_positives:
                    continue
                tp, fn = probs[m & (pred == c), c].sum(), probs[m & (pred != c), c].sum()
                out[(attr, str(v), classes[c])] = (float(tp / (tp + fn)), float((pred[pos] == c).mean()))
    return out


def mae(cells: dict[tuple[str, str, str], tuple[float, float]]) -> float:
    return statistics.fmean(abs(e - r) for e, r in cells.values())


def class_diagnosis(logits: dict[str, np.ndarray], data: Any, calib_split: str) -> dict[str, Any]:
    """Per class: recall and the uncalibrated (T = 1) estimate on the calibration split and on the deploy
    stream by site: where the hold-out and the deployment disagree, no hold-out calibration can follow."""
    at_b = calibration_at_b(data).numpy()
    parts = {"calibration/A": (logits[calib_split], data.y_calib.numpy(), ~at_b),
             "calibration/B": (logits[calib_split], data.y_calib.numpy(), at_b)}
    site = np.asarray(data.attributes_deploy["site"])
    parts.update({f"deploy/{v}": (logits["deploy"], data.y_deploy.numpy(), site == v) for v in ("A", "B")})
    out: dict[str, Any] = {}
    for part, (z, y, m) in parts.items():
        pred, probs = z.argmax(1), calibrated_probabilities(z)
        for c, name in enumerate(data.classes):
            pos = m & (y == c)
            tp, fn = probs[m & (pred == c), c].sum(), probs[m & (pred != c), c].sum()
            out.setdefault(name, {})[part] = {"positives": int(pos.sum()),
                                              "recall": float((pred[pos] == c).mean()) if pos.any() else None,
                                              "estimate_t1": float(tp / (tp + fn)) if tp + fn > 0 else None}
    return out


def offline(logits: dict[str, np.ndarray], data: Any, min_positives: int, served: dict[str, Any],
            seed: int, args: Any) -> dict[str, Any]:
    """Calibration choices, regularisation path, noise floor and the oracle bound for one model (module doc, item 3)."""
    y, yc = data.y_deploy.numpy(), data.y_calib.numpy()
    attrs = {k: np.asarray(v) for k, v in data.attributes_deploy.items()}
    pred = logits["deploy"].argmax(1)
    groups = source_groups(data)

    def cells(probs: np.ndarray) -> dict[tuple[str, str, str], tuple[float, float]]:
        return cell_estimates(probs, pred, y, attrs, data.classes, min_positives)

    def at(t: float) -> dict[tuple[str, str, str], tuple[float, float]]:
        return cells(calibrated_probabilities(logits["deploy"], t))

    choices = {}
    for split in ("clean", "deployment"):
        for objective in ("nll", "brier"):
            for family in ("temperature", "auto"):
                c = fit_calibration(logits[split], yc, family, objective, groups=groups, seed=seed)  # type: ignore[arg-type]
                choices[f"{split}/{objective}/{family}"] = {
                    "family": c.family, "penalty": c.penalty, "temperature": c.temperature,
                    "mean_abs_error": mae(cells(c.probabilities(logits["deploy"])))}
    z_cal = logits[args.calibration_data]
    path = {f"{lam:g}": mae(cells(fit_vector_scaling(z_cal, yc, lam, objective=args.calibration_objective)
                                  .probabilities(logits["deploy"]))) for lam in PENALTIES}
    fold_seeds = {}
    for s in range(1, 5):
        c = fit_calibration(z_cal, yc, args.calibration_family, args.calibration_objective, groups=groups, seed=seed + s)
        fold_seeds[str(seed + s)] = {"family": c.family, "penalty": c.penalty,
                                     "mean_abs_error": mae(cells(c.probabilities(logits["deploy"])))}
    spec = served["calibration"]
    probs = calibrated_probabilities(logits["deploy"], spec["temperature"], spec.get("scales"), spec.get("biases"))
    served_cells = cells(probs)
    gateway_gap = max(abs(served_cells[(c["attribute"], c["value"], c["class"])][0] - c["estimated"])
                      for c in served["cells"])
    grid = np.geomspace(0.2, 5.0, 241)
    oracle = [mae(at(float(t))) for t in grid]
    rng = np.random.default_rng(seed)
    floor = []
    for _ in range(200):  # labels drawn from the calibrated probabilities: what realized recall's noise alone gives
        drawn = (rng.random(len(probs))[:, None] > np.cumsum(probs, 1)).sum(1).clip(0, probs.shape[1] - 1)
        floor.append(mae(cell_estimates(probs, pred, drawn, attrs, data.classes, min_positives)))

    def by_class(c: dict[tuple[str, str, str], tuple[float, float]]) -> dict[str, float]:
        return {k: statistics.fmean(abs(e - r) for (_, _, kk), (e, r) in c.items() if kk == k)
                for k in data.classes if any(kk == k for (_, _, kk) in c)}

    return {
        "calibration_choices": choices,
        "vector_scaling_path_mean_abs_error": path,
        "served_family_other_fold_seeds": fold_seeds,
        "max_difference_to_gateway_estimate": gateway_gap,
        "noise_floor_mean_abs_error": statistics.fmean(floor),
        "oracle_temperature_on_deploy_stream": {"temperature": float(grid[int(np.argmin(oracle))]),
                                                "mean_abs_error": float(min(oracle))},
        "mean_abs_error_by_class": by_class(served_cells),
        "mean_abs_error_by_class_temperature_only": by_class(at(float(choices[  # type: ignore[arg-type]
            f"{args.calibration_data}/{args.calibration_objective}/temperature"]["temperature"]))),
        "class_diagnosis": class_diagnosis(logits, data, args.calibration_data),
    }


async def stream(bundle: Path, state: Path, data: Any, batch: int, min_positives: int) -> dict[str, Any]:
    gw = Gateway(GatewayConfig(bundle=bundle, state_dir=state, receipt_key="f" * 32, provider="cpu",
                               max_batch=batch), registry=CollectorRegistry(), cuda_devices=0)
    app = create_app(lambda: gw)
    attrs = data.attributes_deploy
    x, y = data.x_deploy.numpy(), data.y_deploy.numpy()
    tally: dict[tuple[str, str, str], int] = {}
    totals: dict[tuple[str, str], int] = {}
    receipts: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            for i in range(0, len(y), batch):
                rows = [{"site": str(attrs["site"][j]), "stroke": str(attrs["stroke"][j])}
                        for j in range(i, min(i + batch, len(y)))]
                r = await http.post("/predict", json={"tensor": x[i : i + batch].tolist(), "attributes": rows})
                r.raise_for_status()
                for row, p, label in zip(rows, r.json()["predictions"], y[i : i + batch]):
                    for name, value in row.items():
                        tally[(name, value, p["class"])] = tally.get((name, value, p["class"]), 0) + 1
                        totals[(name, value)] = totals.get((name, value), 0) + 1
                    receipts.append((p["receipt"], data.classes[int(label)]))
            before = (await http.get("/compliance")).json()
            for receipt, label in receipts:
                (await http.post("/feedback", json={"receipt": receipt, "label": label})).raise_for_status()
            after = (await http.get("/compliance")).json()
    finally:
        await gw.batcher.aclose()
        gw.close()
    seconds = time.perf_counter() - t0
    mismatches = [e for e in before["selection"]
                  if e["predicted"] != tally.get((e["attribute"], e["value"], e["class"]), 0)
                  or e["total"] != totals.get((e["attribute"], e["value"]), 0)]
    ratio_errors = []
    for e in before["selection"]:
        rates = {v: tally.get((e["attribute"], v, e["class"]), 0) / totals[(e["attribute"], v)]
                 for (a, v) in totals if a == e["attribute"]}
        top = max(rates.values())
        if top and e["ratio_to_max"] is not None:
            ratio_errors.append(abs(e["ratio_to_max"] - rates[e["value"]] / top))
    realized = {(e["attribute"], e["value"], e["class"]): e for e in after["estimated"]}
    cells = []
    for e in before["estimated"]:
        r = realized[(e["attribute"], e["value"], e["class"])]
        if r["labelled"] >= min_positives and e["estimated_recall"] is not None:
            cells.append({"attribute": e["attribute"], "value": e["value"], "class": e["class"],
                          "estimated": e["estimated_recall"], "realized": r["realized_recall"],
                          "error": abs(e["estimated_recall"] - r["realized_recall"]), "labelled": r["labelled"],
                          "trusted": e["trusted"]})
    trusted = [c["error"] for c in cells if c["trusted"]]
    return {
        "rows": len(y), "seconds": seconds,
        "selection_exact": not mismatches, "selection_mismatches": mismatches[:5],
        "ratio_to_max_max_error": max(ratio_errors) if ratio_errors else None,
        "estimate_cells": len(cells),
        "mean_abs_error": statistics.fmean(c["error"] for c in cells) if cells else None,
        "mean_abs_error_trusted": statistics.fmean(trusted) if trusted else None,
        "trusted_cells": len(trusted),
        "cells": cells,
        "flags_before_feedback": [f for f in before["flags"] if f["kind"] == "adverse_impact"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/fairness.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-share", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-positives", type=int, default=30)
    p.add_argument("--calibration-data", choices=["deployment", "clean"], default="deployment")
    p.add_argument("--calibration-objective", choices=["brier", "nll"], default="brier")
    p.add_argument("--calibration-family", choices=["auto", "vector", "temperature"], default="auto")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data, bundles, logits = make_bundles(args.seed, args.calibration_share, args.calibration_data,
                                             args.calibration_objective, args.calibration_family, Path(tmp), lambda m: print(m, flush=True))
        models = {name: asyncio.run(stream(path, Path(tmp) / f"state-{name}", data, args.batch, args.min_positives))
                  for name, path in bundles.items()}
        for name, path in bundles.items():
            served = {"calibration": json.loads((path / "manifest.json").read_text())["calibration"],
                      "cells": models[name]["cells"]}
            models[name]["calibration"] = served["calibration"]
            models[name]["offline"] = offline(logits[name], data, args.min_positives, served, args.seed, args)
    refined = models["pca-egem"]
    result = {
        "config": vars(args), "seconds": time.perf_counter() - t0, "models": models,
        "bars": {
            "selection_exact": {"pass": all(m["selection_exact"] for m in models.values())},
            "ratio_to_max": {"max_error": max((m["ratio_to_max_max_error"] or 0) for m in models.values()),
                             "pass": all((m["ratio_to_max_max_error"] or 0) < 1e-9 for m in models.values())},
            "estimate_refined_mae_le_0.05": {"value": refined["mean_abs_error"], "cells": refined["estimate_cells"],
                                             "pass": refined["mean_abs_error"] is not None
                                             and refined["mean_abs_error"] <= 0.05},
            "estimate_original_mae": {"value": models["original"]["mean_abs_error"],
                                      "trusted_only": models["original"]["mean_abs_error_trusted"]},
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    for name, m in models.items():
        print(f"{name}: selection exact {m['selection_exact']}, estimate MAE {m['mean_abs_error']} over "
              f"{m['estimate_cells']} cells (trusted {m['mean_abs_error_trusted']} over {m['trusted_cells']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
