"""The gateway at 64-row batches on any bundle, beside bare onnxruntime (issue 13's batch bar, off the digits).

    python benchmarks/gateway_model_bench.py --bundle BUNDLE --out benchmarks/results/gateway_models.json

``service_bench.py`` measures the batch-64 bar on the demo's 28x28 digits model, whose run costs
a fraction of a millisecond per row: there the gateway's per-request and per-row work (HTTP, the
reply, a receipt per row, the store, metrics) weighs as much as the model. This script takes any
bundle (for instance a torchvision model at 224 px kept by ``models_bench.py --keep-bundles``) and
measures the same comparison on it, with the same tools: the gateway (``hansgate serve``,
monitoring on, ``--workers`` workers, one onnxruntime thread each, micro-batches of 64 rows) under
wrk posting 64-row ``.npy`` bodies (uniform random pixels in the manifest's value range), and
``--workers`` bare onnxruntime loops at batch 64 with every graph output fetched, in rounds where
bare runs just before and just after the gateway's run (``load.bracketed``: the anchor is their
mean). It records rows/s, CPU per 64-row request (server process tree vs bare run), the CPU split by
thread and ``batch64_gap`` (``load.batch64_gap``). Every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from load import (  # noqa: E402  (benchmarks/load.py, beside this script)
    WRK_SCRIPT,
    batch64_gap,
    bracketed,
    median,
    npy_bytes,
    start_gateway,
    wrk,
)

ROWS = 64


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement time per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4, help="wrk connections (each sends 64-row bodies)")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    import onnxruntime as ort

    from hansgate.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    spec = bundle.manifest.input
    lo, hi = spec.value_range
    x = np.random.default_rng(0).uniform(lo, hi, (ROWS, *spec.shape)).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="hansgate-gateway-model-bench-"))
    body = work / "batch64.npy"
    body.write_bytes(npy_bytes(x))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    env = {"HANSGATE_MAX_BODY_BYTES": str(body.stat().st_size + 2**20), "HANSGATE_MAX_BATCH": str(ROWS),
           "HANSGATE_TIMEOUT_S": "600"}
    result: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__,
                    "load_average_at_start": list(os.getloadavg())},
        "bundle": {"path": str(args.bundle), "source_model": bundle.manifest.source_model.spec,
                   "method": bundle.manifest.method.name, "input": list(spec.shape),
                   "onnx_mib": round(bundle.onnx_path.stat().st_size / 2**20, 1),
                   "body_mib": round(body.stat().st_size / 2**20, 2), "concepts": len(bundle.manifest.concepts)},
        "config": {"workers": args.workers, "seconds": args.seconds, "rounds": args.rounds,
                   "connections": args.connections, "rows_per_request": ROWS, "onnxruntime_threads_per_process": 1,
                   "gateway_env": env},
        "gpu": {"measured": False, "note": "no CUDA device on this machine: every figure is CPU"},
    }
    rounds: list[dict] = []
    server = start_gateway(args.bundle, work, "gateway", args.workers, True, extra_env=env)
    try:
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
            run, anchors = bracketed(bundle.onnx_path, args.seconds, args.workers,
                                     lambda: wrk(server.base, body, args.seconds, args.connections, script,
                                                 warmup_s=2.0, cpu_root=server.proc.pid))
            r: dict = {"batch64": {"gateway": run}} | anchors
            r["load_average_1m"] = os.getloadavg()[0]
            rounds.append(r)
    finally:
        server.stop()
    result["rounds"] = rounds
    result["medians"] = medians(rounds)
    result["bars"] = bars(result["medians"], rounds)
    m = result["medians"]
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"medians": m, "bars": result["bars"]}, indent=2))
    return 0


def medians(rounds: list[dict]) -> dict:
    """Medians over rounds of rows/s, CPU per 64 rows and their ratios. Two bare anchors: onnxruntime's
    defaults (what a user's loop runs) and the gateway's session options (memory patterns off), which
    at 224 px can differ by more than the bar's margin."""
    gw = [r["batch64"]["gateway"] for r in rounds]
    return {
        "gateway_rows_per_s": ROWS * median([g["requests_per_s"] for g in gw]),
        "bare_onnxruntime_rows_per_s": median([r["bare_onnxruntime_batch64_rows_per_s"] for r in rounds]),
        "gateway_over_bare_onnxruntime": median([ROWS * r["batch64"]["gateway"]["requests_per_s"]
                                                 / r["bare_onnxruntime_batch64_rows_per_s"] for r in rounds]),
        "gateway_cpu_ms_per_request": median([g["server_cpu_ms_per_request"] for g in gw]),
        "bare_onnxruntime_cpu_ms_per_batch64": median([r["bare_onnxruntime_cpu_ms_per_batch64"] for r in rounds]),
        "bare_onnxruntime_gateway_options_cpu_ms_per_batch64": median(
            [r["bare_onnxruntime_gateway_options_cpu_ms_per_batch64"] for r in rounds]),
        "cpu_bare_over_gateway": median([r["bare_onnxruntime_cpu_ms_per_batch64"]
                                         / r["batch64"]["gateway"]["server_cpu_ms_per_request"] for r in rounds]),
        "cpu_bare_gateway_options_over_gateway": median(
            [r["bare_onnxruntime_gateway_options_cpu_ms_per_batch64"]
             / r["batch64"]["gateway"]["server_cpu_ms_per_request"] for r in rounds]),
        "batch64_gap": batch64_gap(rounds),
    }


def bars(m: dict, rounds: list[dict]) -> dict:
    errors = sum(r["batch64"]["gateway"]["non_2xx"] + r["batch64"]["gateway"]["socket_errors"] for r in rounds)
    return {"batch64_vs_bare_onnxruntime_ge_0.9": m["gateway_over_bare_onnxruntime"] >= 0.9,
            "batch64_cpu_bare_over_gateway_ge_0.9": m["cpu_bare_over_gateway"] >= 0.9,
            "batch64_cpu_bare_gateway_options_over_gateway_ge_0.9": m["cpu_bare_gateway_options_over_gateway"] >= 0.9,
            "no_errors": errors == 0}


if __name__ == "__main__":
    raise SystemExit(main())
