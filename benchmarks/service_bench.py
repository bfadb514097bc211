"""Gateway benchmark (issue 13 bars): the gateway against two anchors, side by side, with wrk.

    python benchmarks/service_bench.py --out benchmarks/results/service.json [--demo-dir DIR]

Servers, all on 127.0.0.1 with the same number of worker processes (``--workers``) and
one onnxruntime thread per worker:

* **gateway** (``hansgate serve``, BentoML), monitoring on, and a second one with
  ``HANSGATE_MONITORING=0`` (graph cut to ``logits``, no concept or prediction metrics);
* **naive app**: the ~30 lines a user would write instead (``NAIVE_APP``: FastAPI + uvicorn
  + onnxruntime, one row per run, no batching, no monitoring), ``uvicorn --workers``;
* **BentoML echo**: a BentoML service whose mounted FastAPI app only echoes the body
  (``ECHO_SERVICE``), default BentoML settings: what BentoML alone costs per request;
* **bare onnxruntime**: the bundle's graph in a loop at batch 64, one process per worker, all
  running at once. It fetches every output (``logits``, ``concept_scores``,
  ``concept_sensitivity``), exactly what the monitoring gateway runs and fetches, so the batch-64
  bar compares like with like; it has no HTTP, decoding, receipts, store or metrics at all. It runs
  just before and just after the gateway's 64-row run in each round, and the anchor is the mean of
  the two (``load.bracketed``): this machine's speed drifts by several per cent within a round.
  (The monitoring-off gateway runs a graph cut to ``logits``: cheaper than this anchor.)

The load generator is wrk (C, one thread, 64 connections, keep-alive): single-row
``.npy`` bodies and 64-row ``.npy`` bodies, ``--seconds`` per run after a warm-up, in
``--rounds`` interleaved rounds (every server measured once per round, so load from
elsewhere on the machine hits all alike); ratios are medians of per-round ratios.
Latency at half the gateway's saturation rate: wrk with a per-connection think time
(``delay()``) chosen so that 16 connections offer half the measured single-row rate.
For every run the server's CPU time per request (the server process and all its
descendants, from /proc) is recorded beside bare onnxruntime's CPU time per batch-64 run: where the machine is
CPU-bound (2 cores, 2 workers, wrk), their ratio bounds the throughput ratio. The server's CPU is also split by
thread (the gateway names its threads in the kernel, ``service.threads``), and ``medians.batch64_gap`` says
where a 64-row request's CPU beyond bare onnxruntime's goes. On a machine shared with
other work, throughput ratios swing from round to round (two tight loops and a server with several
threads are starved differently); CPU time per request is the steadier figure, and the load average
is recorded with every round.
Every figure is measured in this run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (benchmarks/load.py, beside this script)
    WRK_SCRIPT,
    Server,
    base_env,
    batch64_gap,
    bracketed,
    free_port,
    median,
    npy_bytes,
    start_gateway,
    wrk,
)

NAIVE_APP = '''
import io, os
import numpy as np, onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
session = ort.InferenceSession(os.environ["MODEL"], opts, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.post("/predict")
async def predict(request: Request):
    x = np.load(io.BytesIO(await request.body()), allow_pickle=False).astype(np.float32)
    if x.ndim == 3:
        x = x[None]
    logits = session.run(["logits"], {"input": x})[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    return JSONResponse({"predictions": [{"class_index": int(p.argmax()), "probabilities": p.tolist()}
                                         for p in probs]})
'''

ECHO_SERVICE = '''
import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI()


@app.post("/predict")
async def echo(request: Request):
    return Response(await request.body(), media_type="application/octet-stream")


@bentoml.service(name="echo", workers={workers})
@bentoml.asgi_app(app, path="/")
class Echo:
    pass
'''

def start_naive(bundle_onnx: Path, work: Path, workers: int) -> Server:
    port = free_port()
    d = work / "naive"
    d.mkdir(exist_ok=True)
    (d / "naive_app.py").write_text(NAIVE_APP)
    env = base_env(work, "naive") | {"MODEL": str(bundle_onnx), "PYTHONPATH": str(d)}
    argv = [sys.executable, "-m", "uvicorn", "naive_app:app", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    return Server("naive", argv, env, d, port, work / "naive.log", "/docs")


def start_echo(work: Path, workers: int) -> Server:
    port = free_port()
    d = work / "echo"
    d.mkdir(exist_ok=True)
    (d / "echo_service.py").write_text(ECHO_SERVICE.format(workers=workers))
    env = base_env(work, "echo") | {"PYTHONPATH": str(d)}
    argv = [sys.executable, "-m", "bentoml", "serve", "echo_service:Echo", "--port", str(port), "--host",
            "127.0.0.1", "--working-dir", str(d)]
    return Server("echo", argv, env, d, port, work / "echo.log", "/readyz")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--demo-dir", type=Path, help="an existing `hansgate demo` output (default: run the demo)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement time per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    from hansgate.bundle import load_bundle
    from hansgate.service.config import GatewayConfig

    work = Path(tempfile.mkdtemp(prefix="hansgate-bench-"))
    demo = args.demo_dir
    if demo is None:
        demo = work / "demo"
        subprocess.run([sys.executable, "-m", "hansgate.cli", "demo", "--out", str(demo), "--seeds", "1",
                        "--methods", "pca-egem", "--quiet"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    bundle = load_bundle(demo / "bundle")
    x = np.load(demo / "data" / "deploy.npz", allow_pickle=False)["x"].astype(np.float32)
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    single, batch64 = work / "single.npy", work / "batch64.npy"
    single.write_bytes(npy_bytes(x[:1]))
    batch64.write_bytes(npy_bytes(x[:64]))
    import onnxruntime as ort

    result: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "load_average_at_start": list(os.getloadavg())},
        "bundle": {"method": bundle.manifest.method.name, "input": list(bundle.manifest.input.shape),
                   "classes": len(bundle.manifest.classes), "concepts": len(bundle.manifest.concepts)},
        "config": {"workers": args.workers, "seconds": args.seconds, "rounds": args.rounds,
                   "connections": args.connections, "load_generator": "wrk -t1 (keep-alive), .npy bodies",
                   "onnxruntime_threads_per_process": 1, "gateway_microbatch_rows": 64,
                   # queued requests merge up to this many rows (GatewayConfig.merge_rows, defaults)
                   "gateway_merge_rows": GatewayConfig(bundle=demo / "bundle").merge_rows(
                       4 * int(np.prod(bundle.manifest.input.shape))),
                   # uvicorn's HTTP/1.1 parser in all three servers: httptools (C) when installed, else h11
                   "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
                   # bare runs onnxruntime's default session (memory patterns on); the gateway turns them off
                   # (micro-batches vary in size, and each size would keep its own pattern)
                   "bare_onnxruntime_mem_pattern": True, "gateway_onnxruntime_mem_pattern": False,
                   "bare_onnxruntime_outputs": [o.name for o in ort.InferenceSession(
                       str(bundle.onnx_path), providers=["CPUExecutionProvider"]).get_outputs()]},
        "gpu": {"measured": False, "note": "no CUDA device on this machine: every figure is CPU"},
    }
    servers: dict[str, Server] = {}
    rounds: list[dict] = []
    try:
        servers["gateway"] = start_gateway(demo / "bundle", work, "gateway", args.workers, True)
        servers["gateway_monitoring_off"] = start_gateway(demo / "bundle", work, "gateway_off", args.workers, False)
        servers["naive"] = start_naive(bundle.onnx_path, work, args.workers)
        servers["bentoml_echo"] = start_echo(work, args.workers)
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
            r: dict = {"single_row": {}, "batch64": {}}
            for name in ("gateway", "naive", "bentoml_echo", "gateway_monitoring_off"):
                r["single_row"][name] = wrk(servers[name].base, single, args.seconds, args.connections, script,
                                            cpu_root=servers[name].proc.pid)
            def batch64_run(name: str) -> dict:
                return wrk(servers[name].base, batch64, args.seconds, 8, script, cpu_root=servers[name].proc.pid)

            r["batch64"]["gateway"], anchors = bracketed(bundle.onnx_path, args.seconds, args.workers,
                                                         lambda: batch64_run("gateway"))
            r["batch64"]["gateway_monitoring_off"] = batch64_run("gateway_monitoring_off")
            r.update(anchors)
            r["load_average_1m"] = os.getloadavg()[0]
            rounds.append(r)
        sat = median([r["single_row"]["gateway"]["requests_per_s"] for r in rounds])
        conns = 16
        # closed loop with think time: each connection waits think_ms between requests
        think = conns / (0.5 * sat) * 1e3
        half = wrk(servers["gateway"].base, single, max(args.seconds, 8.0), conns, script, think_ms=think)
        naive_half = wrk(servers["naive"].base, single, max(args.seconds, 8.0), conns, script, think_ms=think)
    finally:
        for s in servers.values():
            s.stop()

    def per_round(f) -> list[float]:
        return [f(r) for r in rounds]

    g1 = per_round(lambda r: r["single_row"]["gateway"]["requests_per_s"])
    ratios = {
        "single_row_gateway_over_naive": per_round(lambda r: r["single_row"]["gateway"]["requests_per_s"]
                                                   / r["single_row"]["naive"]["requests_per_s"]),
        "single_row_gateway_over_bentoml_echo": per_round(lambda r: r["single_row"]["gateway"]["requests_per_s"]
                                                          / r["single_row"]["bentoml_echo"]["requests_per_s"]),
        "batch64_gateway_over_bare_onnxruntime": per_round(
            lambda r: 64 * r["batch64"]["gateway"]["requests_per_s"] / r["bare_onnxruntime_batch64_rows_per_s"]),
        "monitoring_on_over_off_single_row": per_round(
            lambda r: r["single_row"]["gateway"]["requests_per_s"]
            / r["single_row"]["gateway_monitoring_off"]["requests_per_s"]),
        "monitoring_on_over_off_batch64": per_round(lambda r: r["batch64"]["gateway"]["requests_per_s"]
                                                    / r["batch64"]["gateway_monitoring_off"]["requests_per_s"]),
    }
    med = {k: median(v) for k, v in ratios.items()}
    cpu_ratio = per_round(lambda r: r["bare_onnxruntime_cpu_ms_per_batch64"]
                          / r["batch64"]["gateway"]["server_cpu_ms_per_request"])
    result_cpu_ratio = median(cpu_ratio)
    errors = sum(run["non_2xx"] + run["socket_errors"] for r in rounds for kind in ("single_row", "batch64")
                 for run in r[kind].values())
    result["rounds"] = rounds
    result["ratios_per_round"] = ratios
    result["medians"] = {
        "single_row_requests_per_s": {n: median(per_round(lambda r, n=n: r["single_row"][n]["requests_per_s"]))
                                      for n in rounds[0]["single_row"]},
        "batch64_rows_per_s": {n: 64 * median(per_round(lambda r, n=n: r["batch64"][n]["requests_per_s"]))
                               for n in rounds[0]["batch64"]}
        | {"bare_onnxruntime": median(per_round(lambda r: r["bare_onnxruntime_batch64_rows_per_s"]))},
        # CPU per 64-row request: where the machine is CPU-bound, bare/gateway bounds the throughput ratio
        "batch64_cpu_ms_per_request": {n: median(per_round(lambda r, n=n: r["batch64"][n]["server_cpu_ms_per_request"]))
                                       for n in rounds[0]["batch64"]}
        | {"bare_onnxruntime": median(per_round(lambda r: r["bare_onnxruntime_cpu_ms_per_batch64"]))},
        "batch64_cpu_bare_over_gateway": median(cpu_ratio),
        "batch64_cpu_bare_gateway_options_over_gateway": median(per_round(
            lambda r: r["bare_onnxruntime_gateway_options_cpu_ms_per_batch64"]
            / r["batch64"]["gateway"]["server_cpu_ms_per_request"])),
        "single_row_cpu_ms_per_request": {n: median(per_round(
            lambda r, n=n: r["single_row"][n]["server_cpu_ms_per_request"])) for n in rounds[0]["single_row"]},
        "monitoring_cpu_off_over_on_single_row": median(per_round(
            lambda r: r["single_row"]["gateway_monitoring_off"]["server_cpu_ms_per_request"]
            / r["single_row"]["gateway"]["server_cpu_ms_per_request"])),
        "monitoring_cpu_off_over_on_batch64": median(per_round(
            lambda r: r["batch64"]["gateway_monitoring_off"]["server_cpu_ms_per_request"]
            / r["batch64"]["gateway"]["server_cpu_ms_per_request"])),
        **med,
    }
    result["medians"]["batch64_gap"] = batch64_gap(rounds)
    result["half_saturation"] = {"gateway_saturation_requests_per_s": float(np.median(g1)), "target_rate": 0.5 * sat,
                                 "gateway": half, "naive_same_offered_load": naive_half}
    medians = result["medians"]
    result["bars"] = {
        "single_row_vs_naive_ge_1.0": med["single_row_gateway_over_naive"] >= 1.0,
        "single_row_vs_bentoml_echo_ge_0.8": med["single_row_gateway_over_bentoml_echo"] >= 0.8,
        "batch64_vs_bare_onnxruntime_ge_0.9": med["batch64_gateway_over_bare_onnxruntime"] >= 0.9,
        # the same bar from CPU time, which load from elsewhere distorts far less than throughput: a busy
        # machine starves 2 bare processes more than the gateway's many threads
        "batch64_cpu_bare_over_gateway_ge_0.9": result_cpu_ratio >= 0.9,
        "monitoring_on_over_off_ge_0.9 (single row)": med["monitoring_on_over_off_single_row"] >= 0.9,
        "monitoring_on_over_off_ge_0.9 (batch64)": med["monitoring_on_over_off_batch64"] >= 0.9,
        "monitoring_cpu_off_over_on_ge_0.9 (single row)": medians["monitoring_cpu_off_over_on_single_row"] >= 0.9,
        "monitoring_cpu_off_over_on_ge_0.9 (batch64)": medians["monitoring_cpu_off_over_on_batch64"] >= 0.9,
        "no_errors": errors == 0 and half["non_2xx"] == 0,
        "half_saturation_p99_ms": half["latency_ms_p99"],
    }
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"medians": result["medians"], "bars": result["bars"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
