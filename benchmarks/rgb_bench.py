"""RGB Clever-Hans benchmark (issue 12): torchvision models trained on colourised digits with a patch shortcut.

For every seed and architecture (torchvision ``resnet18``, ``mobilenet_v3_small``, random init,
no download): train on the biased split, recalibrate the batch-norm running statistics on
the training data (short CPU training leaves them behind; mobilenet's momentum is 0.01),
draw the verified refinement set, refine with every method, and measure accuracy on the
clean and the 100 %-patched test set (paper 000's 0 % / 100 % protocol). RR-ClArC runs
beside the EGEM family with the patch as its concept (clean vs patched verified images).

Bars (issue 12): with resnet18, the best of EGEM / PCA-EGEM under the 5 % slack rule closes
at least a third of the original's clean-poisoned gap with clean accuracy within 5 points.
The JSON also carries, per architecture, where in the network the patch is visible
(``patch``: a linear probe for "has the patch" and the share of the patch's activation shift
inside the clean data's principal subspace, at every refined layer), the evidence
for why the EGEM family does or does not move a shortcut.

Default-vs-variant rows (issue 14): ``--variants pca-egem:conv_mode=linear rr-clarc:project ...`` adds,
in the same run (same trained model and verified set), one row per variant: the method's default
configuration with only the named fields changed (``rr-clarc:project`` is the project's earlier
RR-ClArC setup, ``clarc_core.PROJECT_SETUP``). ``--variants defaults`` runs every changed default
of issue 14 that applies to several refined layers (``DEFAULT_VARIANTS``).

Usage: python benchmarks/rgb_bench.py --out benchmarks/results/rgb.json [--seeds 0 1 2] [--epochs 8]
       [--retrain-lr 1e-4] [--methods egem pca-egem ...] [--variants defaults]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from pydantic import ValidationError
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hansgate.data.rgb import RgbConfig, make_rgb_clever_hans, paste_patch  # noqa: E402
from hansgate.nn.surgery import resolve_layers  # noqa: E402
from hansgate.nn.training import TrainConfig, accuracy, train_classifier  # noqa: E402
from hansgate.refinement.clarc import ClarcConfig, ConceptData, refine_clarc  # noqa: E402
from hansgate.refinement.clarc_core import PROJECT_SETUP  # noqa: E402
from hansgate.refinement.methods import RefineConfig, refine_model  # noqa: E402
from hansgate.refinement.pipeline import per_class_subset, verified_subset  # noqa: E402

METHODS = ("egem", "pca-egem", "rgem", "ridge", "retrain")
#: Supp. F.3 sets Retrain's Adam rate per model (1e-3 MNIST net ... 5e-6 ResNet50); the MNIST rate
#: wrecks resnet18 here in its first epoch (held-out accuracy 0.17 after epoch 1), so an order lower.
RETRAIN_LR = 1e-4
#: issue 14's changed defaults, each as the earlier choice: conv-map rule (1), float32 statistics (3),
#: one split refitted on all data (7), bisection lambda search (8), the project's RR-ClArC setup (4)
DEFAULT_VARIANTS = ("pca-egem:conv_mode=linear", "pca-egem:precision=float32",
                    "pca-egem:final_fit=all,repetitions=1", "pca-egem:lambda_rule=bisect",
                    "egem:final_fit=all,repetitions=1", "rr-clarc:project")


def build(arch: str) -> nn.Module:
    """A torchvision architecture with 10 outputs and random weights (nothing is downloaded)."""
    return getattr(torchvision.models, arch)(num_classes=10)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running mean/var as the plain average over ``x`` (momentum ``None``)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    for m, momentum in saved:
        m.momentum = momentum
    return model.eval()


def scores(model: nn.Module, data: Any) -> dict[str, float]:
    return {"clean_acc": accuracy(model, data.x_test, data.y_test),
            "poisoned_acc": accuracy(model, data.x_test_poisoned, data.y_test)}


@torch.no_grad()
def patch_probe(model: nn.Module, layers: list[str], x: torch.Tensor, cfg: RgbConfig) -> dict[str, dict[str, float]]:
    """Where the patch lives, per refined layer, on channel-averaged activations of clean vs patched copies.

    ``probe``: held-out accuracy of a logistic probe for "carries the patch".
    ``shift_in_clean_subspace``: share of the mean activation shift the patch causes that lies in the
    principal subspace holding 99 % of the clean data's variance. Exposure minimisation scales down
    directions the verified (clean) data does not exercise; a shift inside the clean subspace cannot
    be removed that way without also damping what clean images use.
    """
    from sklearn.linear_model import LogisticRegression

    from hansgate.nn.hooks import capture, eval_mode

    xp = paste_patch(x, torch.ones(len(x), dtype=torch.bool), cfg)
    with eval_mode(model), capture(model, layers) as store:
        model(x)
        model(xp)
    out = {}
    for name in layers:
        clean, patched = ((a.mean(dim=(2, 3)) if a.dim() == 4 else a.flatten(1)).double() for a in store[name])
        half = len(x) // 2
        feats = torch.cat([clean[:half], patched[half:]]).numpy()
        label = torch.cat([torch.zeros(half), torch.ones(len(x) - half)]).numpy()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).numpy()
        train, test = order[: len(x) // 2], order[len(x) // 2 :]
        probe = LogisticRegression(max_iter=2000).fit(feats[train], label[train])
        centred = clean - clean.mean(0)
        _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
        var = sv**2
        k = int((torch.cumsum(var, 0) / var.sum() < 0.99).sum()) + 1
        shift = (patched - clean).mean(0)
        inside = float((vt[:k] @ shift).norm() ** 2 / shift.norm() ** 2) if shift.norm() > 0 else 0.0
        out[name] = {"probe": float(probe.score(feats[test], label[test])), "shift_in_clean_subspace": inside,
                     "clean_components_99": k, "units": int(clean.shape[1])}
    return out


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``"pca-egem:conv_mode=linear,precision=float32"`` -> ``(row name, method, changed fields)``."""
    method, _, fields = spec.partition(":")
    if not fields:
        raise SystemExit(f"variant {spec!r}: expected METHOD:FIELD=VALUE[,FIELD=VALUE] or rr-clarc:project")
    if method == "rr-clarc":
        if fields != "project":
            raise SystemExit(f"variant {spec!r}: RR-ClArC variants: rr-clarc:project")
        return "rr-clarc[project]", method, dict(PROJECT_SETUP)
    if method not in METHODS:
        raise SystemExit(f"variant {spec!r}: unknown method {method!r}; choose from {METHODS} or rr-clarc")
    changed = dict(kv.split("=", 1) for kv in fields.split(","))
    try:  # a bad field or value stops here, before any training
        RefineConfig.model_validate({"method": method, **changed})
    except ValidationError as exc:
        raise SystemExit(f"variant {spec!r}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    return f"{method}[{fields}]", method, changed


def _rr_clarc(model: nn.Module, xr: torch.Tensor, yr: torch.Tensor, cfg: RgbConfig, seed: int,
              changed: dict[str, Any]) -> nn.Module:
    """RR-ClArC with the patch as its concept (clean vs patched verified images), 3 epochs."""
    concept = ConceptData(torch.cat([xr, paste_patch(xr, torch.ones(len(xr), dtype=torch.bool), cfg)]),
                          torch.cat([yr, yr]), torch.cat([torch.zeros(len(yr)), torch.ones(len(yr))]).bool())
    config = ClarcConfig(method="rr-clarc", seed=seed, epochs=3).model_copy(update=changed)
    return refine_clarc(model, xr, yr, concept, config).model


def run(arch: str, seed: int, epochs: int, per_class: int, log: Any, retrain_lr: float = RETRAIN_LR,
        methods: tuple[str, ...] = METHODS, variants: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg = RgbConfig(seed=seed)
    data = make_rgb_clever_hans(cfg)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = train_classifier(build(arch), data.x_train, data.y_train,
                             TrainConfig(epochs=epochs, lr=1e-3, batch_size=128, seed=seed))
    recalibrate_batchnorm(model, data.x_train)
    row: dict[str, Any] = {"train_s": time.perf_counter() - t0, "scores": {"original": scores(model, data)}}
    log(f"{arch} seed {seed}: original {row['scores']['original']}")
    xr, yr = per_class_subset(*verified_subset(model, data.x_refine, data.y_refine), per_class, seed)
    row["verified"] = len(yr)
    layers = resolve_layers(model, xr[:1], None)
    row["layers"] = layers
    row["patch"] = patch_probe(model, layers, data.x_test[:400], cfg)
    row["hyperparameters"] = {}
    for method in methods:
        t = time.perf_counter()
        res = refine_model(model, xr, yr, RefineConfig(method=method, seed=seed, retrain_lr=retrain_lr))
        row["scores"][method] = scores(res.model, data) | {"seconds": time.perf_counter() - t}
        row["hyperparameters"][method] = {k: v for k, v in res.hyperparameters.items()
                                          if isinstance(v, (int, float, str, bool))}
        log(f"{arch} seed {seed}: {method} {row['scores'][method]}")
    t = time.perf_counter()
    row["scores"]["rr-clarc"] = scores(_rr_clarc(model, xr, yr, cfg, seed, {}), data) | {
        "seconds": time.perf_counter() - t}
    log(f"{arch} seed {seed}: rr-clarc {row['scores']['rr-clarc']}")
    for name, method, changed in map(parse_variant, variants):
        t = time.perf_counter()
        if method == "rr-clarc":
            refined = _rr_clarc(model, xr, yr, cfg, seed, changed)
        else:
            res = refine_model(model, xr, yr, RefineConfig.model_validate(
                {"method": method, "seed": seed, "retrain_lr": retrain_lr, **changed}))
            refined = res.model
            row["hyperparameters"][name] = {k: v for k, v in res.hyperparameters.items()
                                            if isinstance(v, (int, float, str, bool))}
        row["scores"][name] = scores(refined, data) | {"seconds": time.perf_counter() - t}
        log(f"{arch} seed {seed}: {name} {row['scores'][name]}")
    return row


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for arch, rows in runs.items():
        methods = list(rows[0]["scores"])
        t: dict[str, Any] = {}
        for m in methods:
            clean = [r["scores"][m]["clean_acc"] for r in rows]
            poisoned = [r["scores"][m]["poisoned_acc"] for r in rows]
            t[m] = {"clean_acc": statistics.fmean(clean), "poisoned_acc": statistics.fmean(poisoned),
                    "clean_acc_std": statistics.pstdev(clean), "poisoned_acc_std": statistics.pstdev(poisoned)}
        orig = t["original"]
        gap = orig["clean_acc"] - orig["poisoned_acc"]
        for m, r in t.items():
            r["gap_closed"] = (r["poisoned_acc"] - orig["poisoned_acc"]) / gap if gap > 0 else None
            r["clean_drop"] = orig["clean_acc"] - r["clean_acc"]
        family = [m for m in ("egem", "pca-egem") if m in t]
        table[arch] = {"methods": t, "original_gap": gap}
        if not family:  # a run of other methods only: no EGEM-family bar
            continue
        best = max(family, key=lambda m: t[m]["gap_closed"] if t[m]["gap_closed"] is not None else -1)
        table[arch] |= {"best_egem_family": best,
                        "bar_third_of_gap": {"value": t[best]["gap_closed"], "clean_drop": t[best]["clean_drop"],
                                            "pass": bool(t[best]["gap_closed"] is not None
                                                         and t[best]["gap_closed"] >= 1 / 3
                                                         and t[best]["clean_drop"] <= 0.05)}}
    return table


def markdown(table: dict[str, Any], seeds: list[int], config: dict[str, Any] | None = None) -> str:
    lines = [f"RGB Clever-Hans benchmark, {len(seeds)} seed(s): clean / 100 %-patched test accuracy (mean).", ""]
    if config:
        lines += [f"Settings: seeds {config['seeds']}, {config['epochs']} training epochs, {config['per_class']} "
                  f"verified images per class, Retrain Adam rate {config['retrain_lr']:g} (batch-norm frozen).", ""]
    for arch, res in table.items():
        bar = (f"; best EGEM family: {res['best_egem_family']}, third-of-gap bar "
               f"{'met' if res['bar_third_of_gap']['pass'] else 'MISSED'}" if "best_egem_family" in res else "")
        lines += [f"**{arch}** (original gap {res['original_gap']:.3f}{bar})", "",
                  "| method | clean | patched | gap closed | clean drop |", "|---|---|---|---|---|"]
        for m, r in res["methods"].items():
            closed = "—" if r["gap_closed"] is None else f"{r['gap_closed']:+.2f}"
            lines.append(f"| {m} | {r['clean_acc']:.3f} | {r['poisoned_acc']:.3f} | {closed} | {r['clean_drop']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/rgb.json")
    p.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--retrain-lr", type=float, default=RETRAIN_LR, help="Retrain's Adam learning rate")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--variants", nargs="*", default=[],
                   help="METHOD:FIELD=VALUE[,...] rows beside the defaults, or 'defaults' for DEFAULT_VARIANTS")
    args = p.parse_args(argv)
    if args.variants == ["defaults"]:
        args.variants = list(DEFAULT_VARIANTS)
    for spec in args.variants:
        parse_variant(spec)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for arch in args.archs:
        for seed in args.seeds:
            runs.setdefault(arch, []).append(run(arch, seed, args.epochs, args.per_class,
                                                 lambda m: print(m, flush=True), args.retrain_lr,
                                                 tuple(args.methods), tuple(args.variants)))
            # written after every run, so that an interrupted benchmark keeps what it measured
            table = summarise(runs)
            result = {"config": vars(args), "complete": False, "table": table, "runs": runs,
                      "seconds": time.perf_counter() - t0, "torch": torch.__version__,
                      "torchvision": torchvision.__version__}
            out.write_text(json.dumps(result, indent=2))
    result["complete"] = True
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(table, args.seeds, vars(args)))
    print(markdown(table, args.seeds, vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
