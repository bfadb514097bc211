"""Benchmark for the refinement core (issue 2): accuracy bars, schedule evidence, cost and memory.

Writes one JSON file with everything it measured:

- ``benchmark``: the Sec. 4.3 table (mean/std over seeds) for the demo configuration,
  with the bars evaluated from the measured numbers;
- ``schedule``: EGEM and PCA-EGEM with the triangular schedule's alpha at the deepest
  layer ("deep", default) vs at the first ("shallow", the printed formula), on the same
  trained models, for the demo model and a second one;
- ``cost``: seconds for statistics + lambda search over all layers vs one plain forward
  pass over the same refinement set, measured side by side (median of repeats);
- ``memory``: peak resident memory added by ``fit`` for two refinement-set sizes, each in
  a fresh subprocess sampling its own RSS.

Usage: python benchmarks/refinement_bench.py --out benchmarks/results/refinement.json [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import seconds  # noqa: E402  (benchmarks/timing.py, beside this script)

from hansgate.data.digits import CleverHansConfig, make_clever_hans  # noqa: E402
from hansgate.nn.training import TrainConfig, accuracy  # noqa: E402
from hansgate.refinement.egem import EgemConfig, ExposureMinimizer, triangular_schedule  # noqa: E402
from hansgate.refinement.evaluation import (  # noqa: E402
    BenchmarkConfig,
    run_benchmark,
    train_demo_model,
    write_results,
)
from hansgate.refinement.methods import RefineConfig, refine_model  # noqa: E402
from hansgate.refinement.pipeline import per_class_subset, verified_subset  # noqa: E402


def bars(table: dict) -> dict:
    orig, pca = table["original"], table["pca-egem"]
    orig_gap = orig["clean_acc"] - orig["poisoned_acc"]
    pca_gap = pca["clean_acc"] - pca["poisoned_acc"]
    return {
        "original_gap": orig_gap,
        "original_gap_at_least_15_points": orig_gap >= 0.15,
        "pca_egem_gap": pca_gap,
        "pca_egem_gap_closed_share": 1 - pca_gap / orig_gap if orig_gap > 0 else None,
        "pca_egem_poisoned_recovery_share": (pca["poisoned_acc"] - orig["poisoned_acc"]) / orig_gap
        if orig_gap > 0 else None,
        "pca_egem_closes_half_the_gap": orig_gap > 0 and pca_gap <= orig_gap / 2
        and pca["poisoned_acc"] - orig["poisoned_acc"] >= orig_gap / 2,
        "pca_egem_clean_drop": orig["clean_acc"] - pca["clean_acc"],
        "pca_egem_clean_within_5_points": orig["clean_acc"] - pca["clean_acc"] <= 0.05,
    }


def schedule_comparison(model_name: str, artifact: str, seeds: list[int], epochs: int) -> dict:
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        data = make_clever_hans(CleverHansConfig(artifact=artifact, seed=seed))
        cfg = BenchmarkConfig(model=model_name, artifact=artifact, train=TrainConfig(epochs=epochs))
        model = train_demo_model(cfg, data, seed)
        xr, yr = per_class_subset(*verified_subset(model, data.x_refine, data.y_refine), 200, seed)
        rows.setdefault("original", {"clean_acc": [], "poisoned_acc": []})
        rows["original"]["clean_acc"].append(accuracy(model, data.x_test, data.y_test))
        rows["original"]["poisoned_acc"].append(accuracy(model, data.x_test_poisoned, data.y_test))
        for method in ("egem", "pca-egem"):
            for schedule in ("deep", "shallow"):
                res = refine_model(model, xr, yr, RefineConfig(method=method, schedule=schedule, seed=seed))
                key = f"{method}/{schedule}"
                rows.setdefault(key, {"clean_acc": [], "poisoned_acc": [], "alpha": []})
                rows[key]["clean_acc"].append(accuracy(res.model, data.x_test, data.y_test))
                rows[key]["poisoned_acc"].append(accuracy(res.model, data.x_test_poisoned, data.y_test))
                rows[key]["alpha"].append(res.hyperparameters["alpha"])
    return {"model": model_name, "artifact": artifact, "epochs": epochs, "seeds": seeds,
            "rows": {k: {m: statistics.fmean(v) for m, v in r.items()} | {"per_seed": r} for k, r in rows.items()}}


def cost(repeats: int = 5) -> dict:
    data = make_clever_hans(CleverHansConfig(seed=0))
    model = train_demo_model(BenchmarkConfig(), data, seed=0)
    xr, _ = per_class_subset(*verified_subset(model, data.x_refine, data.y_refine), 200, 0)
    out = {"n_samples": len(xr), "batch_size": 256, "repeats": repeats, "torch_threads": torch.get_num_threads()}

    @torch.no_grad()
    def forward_pass() -> None:
        for i in range(0, len(xr), 256):
            model(xr[i : i + 256])

    for name, pca in (("egem", False), ("pca-egem", True)):
        def stats_and_search() -> None:
            em = ExposureMinimizer(EgemConfig(pca=pca)).fit(model, xr)
            for layer, tau in zip(em.layers_, triangular_schedule(0.1, len(em.layers_))):
                em._search(layer, tau)

        forward_pass()  # warm-up both
        stats_and_search()
        # interleave the two measurements so machine noise hits both alike
        fwd, ref = [], []
        for _ in range(repeats):
            fwd.append(seconds(forward_pass))
            ref.append(seconds(stats_and_search))
        out[name] = {"forward_s": statistics.median(fwd), "stats_and_search_s": statistics.median(ref),
                     "ratio": statistics.median(ref) / statistics.median(fwd), "bar_at_most_2x":
                     statistics.median(ref) / statistics.median(fwd) <= 2.0}
    return out


def _peak_fit(path: str, n: int, queue: "mp.Queue") -> None:
    torch.set_num_threads(1)
    blob = torch.load(path, weights_only=True)
    from hansgate.nn.models import build_builtin

    model = build_builtin("small_vgg")
    model.load_state_dict(blob["state"])
    x = blob["x"][:n].clone()
    del blob

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    base = rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    ExposureMinimizer(EgemConfig(pca=True, batch_size=128)).fit(model, x)
    done.set()
    t.join()
    queue.put({"n": n, "rss_before_mb": base / 2**20, "peak_added_mb": (peak[0] - base) / 2**20})


def memory(tmp: Path) -> dict:
    data = make_clever_hans(CleverHansConfig(seed=0))
    model = train_demo_model(BenchmarkConfig(), data, seed=0)
    path = tmp / "mem_blob.pt"
    torch.save({"state": model.state_dict(), "x": data.x_train}, path)
    ctx = mp.get_context("spawn")
    rows = []
    for n in (512, 4096):
        q = ctx.Queue()
        p = ctx.Process(target=_peak_fit, args=(str(path), n, q))
        p.start()
        rows.append(q.get(timeout=600))
        p.join()
    path.unlink()
    small, large = rows
    return {"rows": rows, "batch_size": 128,
            "peak_growth_mb_for_8x_samples": large["peak_added_mb"] - small["peak_added_mb"],
            "note": "peak RSS added by fit() in a fresh process, sampled every 2 ms; the data tensor is loaded "
                    "before the baseline is taken"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/refinement.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["benchmark", "schedule", "cost", "memory"],
                    choices=["benchmark", "schedule", "cost", "memory"],
                    help="measure only these parts; the others are kept from an existing --out file")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = json.loads(out.read_text()) if out.exists() and len(args.parts) < 4 else {}
    report.setdefault("commands", []).append(" ".join(sys.argv))
    report["torch"] = torch.__version__
    if "benchmark" in args.parts:
        res = run_benchmark(BenchmarkConfig(seeds=tuple(range(args.seeds))), progress=True)
        write_results(res, out.parent / "refinement_table")
        report["benchmark"] = {"table": res.table(), "bars": bars(res.table()), "seconds": res.seconds,
                               "config": json.loads(res.config.model_dump_json())}
        print(json.dumps(report["benchmark"]["bars"], indent=2), flush=True)
    if "schedule" in args.parts:
        report["schedule"] = [schedule_comparison("small_vgg", "corner", list(range(args.seeds)), 5),
                              schedule_comparison("mnist_cnn", "frame", list(range(args.seeds)), 30)]
    if "cost" in args.parts:
        report["cost"] = cost()
        print(json.dumps(report["cost"], indent=2), flush=True)
    if "memory" in args.parts:
        report["memory"] = memory(out.parent)
    report[f"seconds_{'_'.join(args.parts)}"] = time.perf_counter() - t0
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
