"""Audit bars of issue 5, measured on the embedded data.

1. The report of the original vs the PCA-EGEM bundle (written by ``hansgate demo``) shows the
   subgroup whose recall the shortcut suppresses (site B) and that refinement raises it; every
   number in the HTML tables is in report.json.
2. Known-artifact test: the training artifact (corner) is flagged for the original model, the
   control artifact (dot) is not.
3. Fairness (issue 15): the four-fifths rule and equalized-odds gaps of the original vs the bundle
   per attribute and class, from the same report.
4. ``hansgate audit`` on 1,000 embedded samples with LRP heatmaps for 32 of them, pinned to two
   CPU cores (``taskset``), within 3 minutes: wall time, CPU time and peak memory (max RSS of
   the child process). The machine's load average is recorded, because the cores are shared.

Usage: ``python benchmarks/audit_bench.py --out benchmarks/results/audit.json [--demo-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def html_numbers_in_json(report_dir: Path) -> dict:
    from hansgate.audit.consistency import html_numbers_missing_from_json

    report = json.loads((report_dir / "report.json").read_text())
    numbers, missing = html_numbers_missing_from_json((report_dir / "report.html").read_text(), report)
    return {"html_table_numbers": len(numbers), "missing_from_json": missing[:20], "all_in_json": not missing}


def run_demo(out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hansgate.cli", "demo", "--out", str(out), "--seeds", "1", "--methods",
                    "pca-egem", "rgem", "--quiet"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed_audit(demo: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "hansgate.cli", "audit", str(demo / "bundle"), "--data", str(demo / "data" / "deploy.npz"),
           "--attributes", str(demo / "data" / "deploy_attributes.csv"), "--out", str(out), "--max-samples", "1000",
           "--heatmaps", "32", "--train-data", str(demo / "data" / "train.npz"), "--region-mask",
           str(demo / "data" / "digit_region.npy"), "--quiet", "--overwrite"]
    pinned = shutil.which("taskset") is not None
    if pinned:
        cmd = ["taskset", "-c", "0,1", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"audit failed: {proc.stderr.strip()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "command": " ".join(cmd[cmd.index("-m"):]), "pinned_to_two_cores": pinned,
        "wall_seconds": wall, "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mib": after.ru_maxrss / 1024, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "n_samples": report["inputs"]["n_samples"], "heatmaps": report["attributions"]["n"],
        "section_seconds": report["timing_seconds"], "within_3_minutes": wall <= 180.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/audit.json")
    ap.add_argument("--demo-dir", help="reuse a directory written by 'hansgate demo' (default: run it)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hansgate-audit-bench-"))
    try:
        result: dict = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
        if args.demo_dir:
            demo = Path(args.demo_dir)
        else:
            demo = tmp / "demo"
            result["demo_seconds"] = run_demo(demo)
        report_dir = demo / "audit"
        report = json.loads((report_dir / "report.json").read_text())
        site = report["subgroups"]["models"]
        b_before, b_after = site["before"]["attributes"]["site"]["B"], site["after"]["attributes"]["site"]["B"]
        a_before = site["before"]["attributes"]["site"]["A"]
        result["bar_subgroup"] = {
            "bundle_method": report["inputs"]["bundle_method"],
            "site_B_flagged_before": b_before["flagged"], "site_A_flagged_before": a_before["flagged"],
            "site_B_macro_recall_before": b_before["macro_recall"], "site_B_macro_recall_after": b_after["macro_recall"],
            "site_B_accuracy_before": b_before["accuracy"], "site_B_accuracy_after": b_after["accuracy"],
            "site_A_macro_recall_before": a_before["macro_recall"],
            "site_A_macro_recall_after": site["after"]["attributes"]["site"]["A"]["macro_recall"],
            "site_B_recall_per_class": {c: {"before": b_before["classes"][c]["recall"]["value"],
                                            "after": b_after["classes"][c]["recall"]["value"]}
                                        for c in report["inputs"]["classes"]},
            "headline": report["headline"],
            "refinement_raises_site_B_recall": b_after["macro_recall"] > b_before["macro_recall"],
            **html_numbers_in_json(report_dir),
        }
        arts = report["artifact_tests"]["artifacts"]
        result["bar_artifacts"] = {
            name: {m: {k: r.get(k) for k in ("flip_rate", "accuracy_drop", "flagged", "relevance_share", "top_target")}
                   for m, r in a["models"].items()} | {"mask_area_share": a["mask_area_share"], "tcav": a.get("tcav")}
            for name, a in arts.items()}
        result["bar_artifacts"]["training_artifact_flagged_for_original"] = arts["corner"]["models"]["before"]["flagged"]
        result["bar_artifacts"]["control_artifact_flagged_for_original"] = arts["dot"]["models"]["before"]["flagged"]
        result["bar_artifacts"]["thresholds"] = {"flip_rate": report["config"]["flip_threshold"],
                                                 "accuracy_drop": report["config"]["accuracy_drop_threshold"]}
        fair = report["fairness"]["models"]
        result["bar_fairness"] = {
            m: {"parity_flagged": [f"{p['attribute']}/{p['class']}" for p in fair[m]["parity"] if p["flagged"]],
                "odds_flagged": [f"{g['attribute']}/{g['class']}" for g in fair[m]["odds_gaps"] if g["flagged"]],
                "site_class_8": next({"ratio": p["ratio"], "min_rate": p["min_rate"], "max_rate": p["max_rate"]}
                                     for p in fair[m]["parity"] if p["attribute"] == "site" and p["class"] == "8")}
            for m in fair}
        result["calibration"] = report["calibration"]
        result["influence"] = {k: report["influence"].get(k) for k in ("fidelity", "rankings", "train_artifact_rate",
                                                                         "n_train", "n_test")}
        result["bar_runtime"] = timed_audit(demo, tmp / "audit_1000")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "influence"}, indent=2)[:4000])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
