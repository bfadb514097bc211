"""Gateway benchmark (issue 4 bars): throughput, latency, monitoring overhead, a load run.

    python benchmarks/service_bench.py --out benchmarks/results/service.json [--demo-dir DIR]

Everything runs on this machine in one run, side by side:

1. **bare onnxruntime**: the bundle's graph in a loop (all outputs, as the gateway fetches
   them; all cores), batch sizes 1..256 -> rows/s and the best batch size; and logits only.
   The best batch size is timed again in every round of step 3, beside the gateway.
2. **gateway** (``hansgate serve``, real BentoML, ``--workers``): rows/s at saturation with
   batched ``.npy`` requests and with single-row requests (adaptive batching), p50/p99
   latency of single-row requests at a moderate open-loop load (half the single-row
   saturation rate).
3. **gateway, monitoring off** (``HANSGATE_MONITORING=0``: graph cut to ``logits``, no
   concept/prediction metrics): the same saturation runs, alternating with the monitored
   gateway in ``--rounds`` rounds (both servers up) -> median overhead ratio.
4. **torch eager BentoML service**: a straightforward single-request service around the
   source model (``@bentoml.api`` taking one tensor, ``model(x)`` under ``no_grad``),
   single-row JSON requests, compared with the gateway on the same requests in the same
   rounds.
5. **load run**: a fresh gateway, ``--load-warmup`` (30,000) then ``--load-requests``
   (20,000) single-row requests at concurrency 64 with feedback for every 4th prediction
   mixed in (half by receipt, half by request id); counts 5xx, compares the counters on
   ``/metrics`` with everything sent, and samples the resident memory of the server
   processes (flatness judged on the 20,000 measured requests).

The load generator (aiohttp) runs in this process and shares the CPU with the servers;
the JSON records the machine. Nothing is hard-coded: every figure is measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TORCH_SERVICE = '''
import bentoml, numpy as np, torch
from hansgate.nn.models import load_model

@bentoml.service(name="torch_eager", workers=1)
class TorchEager:
    def __init__(self):
        import os
        self.model = load_model("{spec}", weights=os.environ["SOURCE_WEIGHTS"]).eval()

    @bentoml.api
    def predict(self, tensor: np.ndarray) -> dict:
        with torch.no_grad():
            logits = self.model(torch.from_numpy(tensor.astype(np.float32)))
        probs = torch.softmax(logits, 1)
        return {{"class_index": int(probs.argmax(1)[0]), "probabilities": probs[0].tolist()}}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


# -- servers -----------------------------------------------------------------------------------------
class Server:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, port: int, log: Path, ready: str) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.base + ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in 180 s; see {log}")

    def rss_mb(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return float("nan")
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def gateway(bundle: Path, work: Path, name: str, workers: int, monitoring: bool) -> Server:
    port = free_port()
    env = dict(os.environ, BENTOML_HOME=str(work / f"bentoml-{name}"), HANSGATE_STATE_DIR=str(work / f"state-{name}"),
               HANSGATE_MONITORING="1" if monitoring else "0", HANSGATE_MAX_CONCURRENCY="1024",
               BENTOML_DO_NOT_TRACK="True")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    argv = [sys.executable, "-m", "hansgate.cli", "serve", str(bundle), "--port", str(port), "--host", "127.0.0.1",
            "--workers", str(workers)]
    return Server(argv, env, ROOT, port, work / f"{name}.log", "/readyz")


def torch_service(spec: str, weights: Path, work: Path) -> Server:
    port = free_port()
    svc_dir = work / "torch_svc"
    svc_dir.mkdir(exist_ok=True)
    (svc_dir / "torch_eager.py").write_text(TORCH_SERVICE.format(spec=spec))
    env = dict(os.environ, BENTOML_HOME=str(work / "bentoml-torch"), SOURCE_WEIGHTS=str(weights),
               PYTHONPATH=f"{svc_dir}{os.pathsep}{ROOT}", BENTOML_DO_NOT_TRACK="True")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    argv = [sys.executable, "-m", "bentoml", "serve", "torch_eager:TorchEager", "--port", str(port), "--host",
            "127.0.0.1", "--working-dir", str(svc_dir)]
    return Server(argv, env, svc_dir, port, work / "torch.log", "/readyz")


# -- load generation ---------------------------------------------------------------------------------
async def closed_loop(base: str, make_request, concurrency: int, seconds: float, warmup: float = 1.5) -> dict:
    """``concurrency`` clients back to back for ``seconds`` (after ``warmup``); rows/s and status counts."""
    import aiohttp

    statuses: Counter = Counter()
    rows = 0
    latencies: list[float] = []
    start = time.perf_counter()
    t_measure = start + warmup
    t_end = t_measure + seconds
    counter = iter(range(1 << 62))

    async def client(session):
        nonlocal rows
        while True:
            now = time.perf_counter()
            if now >= t_end:
                return
            path, kwargs, n = make_request(next(counter))
            t0 = time.perf_counter()
            async with session.post(base + path, **kwargs) as r:
                await r.read()
                status = r.status
            t1 = time.perf_counter()
            if t0 >= t_measure:
                statuses[status] += 1
                latencies.append(t1 - t0)
                if status == 200:
                    rows += n

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*[client(session) for _ in range(concurrency)])
    lat = np.asarray(latencies)
    return {"rows_per_s": rows / seconds, "requests_per_s": int(lat.size) / seconds, "concurrency": concurrency,
            "seconds": seconds, "statuses": {str(k): v for k, v in statuses.items()},
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
            "latency_ms_p99": float(np.percentile(lat, 99) * 1e3) if lat.size else None}


async def open_loop(base: str, make_request, rate: float, seconds: float) -> dict:
    """Requests started at a fixed ``rate`` per second (latency without queueing by the client)."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()

    async def one(session, i):
        path, kwargs, _ = make_request(i)
        t0 = time.perf_counter()
        async with session.post(base + path, **kwargs) as r:
            await r.read()
            statuses[r.status] += 1
        latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks = []
        t_start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = t_start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
        await asyncio.gather(*tasks)
    lat = np.asarray(latencies)
    return {"rate_per_s": rate, "requests": n, "statuses": {str(k): v for k, v in statuses.items()},
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3), "latency_ms_p99": float(np.percentile(lat, 99) * 1e3)}


# -- phases ------------------------------------------------------------------------------------------
def bare_onnxruntime(bundle, x: np.ndarray, seconds: float) -> dict:
    """Sweep of the bare loop: batch sizes x intra-op threads (1 and all cores), all outputs; logits only too."""
    out: dict = {"by_threads_and_batch": {}, "logits_only_by_batch": {}}
    cores = os.cpu_count() or 1
    for threads in sorted({1, cores}):
        out["by_threads_and_batch"][str(threads)] = {
            str(bs): bare_rows_per_s(bundle, x, bs, seconds, threads) for bs in (1, 8, 32, 64, 128, 256)}
    out["logits_only_by_batch"] = {str(bs): bare_rows_per_s(bundle, x, bs, seconds, cores, ["logits"])
                                   for bs in (1, 64, 256)}
    best = max(((t, b, v) for t, d in out["by_threads_and_batch"].items() for b, v in d.items()), key=lambda r: r[2])
    out["best_threads"], out["best_batch"], out["best_rows_per_s"] = int(best[0]), int(best[1]), best[2]
    return out


def bare_rows_per_s(bundle, x: np.ndarray, batch: int, seconds: float, threads: int,
                    outputs: list[str] | None = None) -> float:
    """Rows/s of the bundle's graph (all outputs unless ``outputs``) at one batch size and thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle.onnx_path), opts, providers=["CPUExecutionProvider"])
    xb = np.ascontiguousarray(x[:batch])
    sess.run(outputs, {"input": xb})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(outputs, {"input": xb})
        n += batch
    return n / (time.perf_counter() - t0)


def scrape(base: str) -> dict[tuple, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10).text
    values: dict[tuple, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("hansgate_"):
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def total(values, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= set(ls))


async def load_run(server: Server, x: np.ndarray, y: np.ndarray, sites: np.ndarray | None, classes: list[str],
                   requests: int, concurrency: int, warmup: int) -> dict:
    """``warmup`` requests, then ``requests`` measured ones (same mix); RSS is judged on the measured part,
    counters on everything sent."""
    import aiohttp

    statuses: Counter = Counter()
    fb_statuses: Counter = Counter()
    predicted: Counter = Counter()
    feedback_sent = 0
    feedback_correct = 0
    errors = 0
    rss: list[tuple[float, float]] = []
    counter = iter(range(warmup + requests))
    bodies = [npy_bytes(x[i : i + 1]) for i in range(len(x))]
    headers = {"content-type": "application/x-npy"}
    t_start = time.perf_counter()
    t_measured: list[float] = []

    async def sampler():
        while True:
            rss.append((time.perf_counter() - t_start, server.rss_mb()))
            await asyncio.sleep(0.5)

    async def client(session):
        nonlocal feedback_sent, feedback_correct, errors
        for i in counter:
            if i == warmup:
                t_measured.append(time.perf_counter() - t_start)
            j = i % len(x)
            try:
                async with session.post(server.base + "/predict", data=bodies[j], headers=headers) as r:
                    body = await r.read()
                    statuses[r.status] += 1
            except aiohttp.ClientError:
                errors += 1
                continue
            if r.status != 200:
                continue
            p = json.loads(body)["predictions"][0]
            predicted[p["class"]] += 1
            if i % 4 == 0:
                fb = {"label": classes[int(y[j])]}
                fb |= {"receipt": p["receipt"]} if i % 8 == 0 else {"request_id": p["request_id"]}
                if sites is not None:
                    fb["attributes"] = {"site": str(sites[j])}
                try:
                    async with session.post(server.base + "/feedback", json=fb) as r2:
                        await r2.read()
                        fb_statuses[r2.status] += 1
                        if r2.status == 200:
                            feedback_sent += 1
                            feedback_correct += int(p["class_index"] == int(y[j]))
                except aiohttp.ClientError:
                    errors += 1

    conn = aiohttp.TCPConnector(limit=concurrency)
    samp = asyncio.create_task(sampler())
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*[client(session) for _ in range(concurrency)])
    samp.cancel()
    seconds = time.perf_counter() - t_start
    rss.append((seconds, server.rss_mb()))
    m = scrape(server.base)
    scraped_pred = {c: total(m, "hansgate_predictions_total", **{"class": c}) for c in classes}
    scraped_accepted = total(m, "hansgate_feedback_requests_total", result="accepted")
    tp = total(m, "hansgate_feedback_total", attribute="_all", outcome="tp")
    fn = total(m, "hansgate_feedback_total", attribute="_all", outcome="fn")
    site_pos = total(m, "hansgate_feedback_total", attribute="site", outcome="tp") + \
        total(m, "hansgate_feedback_total", attribute="site", outcome="fn")
    # RSS flat after warm-up: the first and last fifth of the measured part
    ts = np.asarray([t for t, _ in rss])
    mb = np.asarray([v for _, v in rss])
    t0_measured = t_measured[0] if t_measured else 0.0
    seg = mb[ts >= t0_measured]
    k = max(1, len(seg) // 5)
    early, late = float(seg[:k].mean()), float(seg[-k:].mean())
    fivexx = sum(v for s, v in statuses.items() if s >= 500) + sum(v for s, v in fb_statuses.items() if s >= 500)
    return {
        "requests": requests, "warmup_requests": warmup, "concurrency": concurrency, "seconds": seconds,
        "measured_seconds": seconds - t0_measured, "requests_per_s": (warmup + requests) / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
        "feedback_statuses": {str(k): v for k, v in fb_statuses.items()},
        "client_errors": errors, "responses_5xx": fivexx,
        "counters": {
            "predictions_sent": sum(predicted.values()), "predictions_scraped": sum(scraped_pred.values()),
            "per_class_equal": all(scraped_pred[c] == predicted.get(c, 0) for c in classes),
            "feedback_sent": feedback_sent, "feedback_accepted_scraped": scraped_accepted,
            "feedback_positives_scraped": tp + fn, "feedback_tp_scraped": tp, "feedback_correct_sent": feedback_correct,
            "site_positives_scraped": site_pos,
            "exact": (sum(predicted.values()) == sum(scraped_pred.values())
                      and all(scraped_pred[c] == predicted.get(c, 0) for c in classes)
                      and scraped_accepted == feedback_sent and tp + fn == feedback_sent
                      and tp == feedback_correct and (sites is None or site_pos == feedback_sent)),
        },
        "rss_mb": {"samples": len(rss), "at_start": float(mb[0]), "at_end_of_warmup": float(seg[0]),
                   "min": float(mb.min()), "max": float(mb.max()),
                   "after_warmup_first_fifth": early, "last_fifth": late, "growth_mb": late - early,
                   "growth_fraction": (late - early) / early},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--demo-dir", type=Path, help="an existing `hansgate demo` output (default: run the demo)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="measurement time per saturation run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating monitoring on/off rounds")
    ap.add_argument("--load-requests", type=int, default=20_000)
    ap.add_argument("--load-warmup", type=int, default=30_000, help="requests before the measured load run")
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args(argv)

    from hansgate.bundle import load_bundle

    work = Path(tempfile.mkdtemp(prefix="hansgate-bench-"))
    demo = args.demo_dir
    if demo is None:
        demo = work / "demo"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hansgate.cli", "demo", "--out", str(demo), "--seeds", "1",
                        "--methods", "pca-egem", "--quiet"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        print(f"demo written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    bundle = load_bundle(demo / "bundle")
    manifest = bundle.manifest
    data = np.load(demo / "data" / "deploy.npz", allow_pickle=False)
    x, y = data["x"].astype(np.float32), data["y"]
    sites = data["attr_site"] if "attr_site" in data.files and any(a.name == "site" for a in manifest.subgroups) \
        else None
    import onnxruntime as ort

    result: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "providers_available": ort.get_available_providers()},
        "bundle": {"method": manifest.method.name, "sha256": manifest.graph.sha256, "classes": len(manifest.classes),
                   "concepts": [c.name for c in manifest.concepts], "input": list(manifest.input.shape)},
        "config": {"workers": args.workers, "seconds": args.seconds, "rounds": args.rounds,
               "concurrency": args.concurrency},
    }
    from hansgate.service.runtime import CUDA, cuda_device_count

    gpu = cuda_device_count() > 0 and CUDA in ort.get_available_providers()
    result["gpu"] = {"cuda_devices": cuda_device_count(), "measured": gpu,
                     "note": None if gpu else "no CUDA device on this machine: every figure is CPU"}

    single = [npy_bytes(x[i : i + 1]) for i in range(256)]
    single_json = [json.dumps({"tensor": x[i : i + 1].tolist()}) for i in range(256)]
    npy_h = {"content-type": "application/x-npy"}
    json_h = {"content-type": "application/json"}

    print("bare onnxruntime ...", file=sys.stderr)
    result["bare_onnxruntime"] = bare_onnxruntime(bundle, x, seconds=2.0)
    best = result["bare_onnxruntime"]["best_batch"]
    batched = [npy_bytes(x[(i * best) % (len(x) - best):][:best]) for i in range(16)]

    def req_batched(i):
        return "/predict", {"data": batched[i % 16], "headers": npy_h}, best

    def req_single(i):
        return "/predict", {"data": single[i % 256], "headers": npy_h}, 1

    def req_single_json(i):
        return "/predict", {"data": single_json[i % 256], "headers": json_h}, 1

    # monitoring on and off side by side: both servers up, measured in alternating rounds so that
    # load from elsewhere on the machine hits both alike; figures are medians over the rounds
    runs: dict = {}
    print("gateway (monitoring on / off, alternating) ...", file=sys.stderr)
    on = gateway(demo / "bundle", work, "gateway", args.workers, True)
    off = gateway(demo / "bundle", work, "gateway_off", args.workers, False)
    spec = manifest.source_model.spec.split(":", 1)[-1]
    eager = torch_service(spec, demo / "source_model.safetensors", work)
    json_rounds: dict = {"gateway": [], "torch_eager_bentoml": []}
    rounds: dict = {"gateway": {"batched_npy": [], "single_npy": []},
                    "gateway_monitoring_off": {"batched_npy": [], "single_npy": []}}
    bare_rounds: list[float] = []
    try:
        for _ in range(args.rounds):
            bare_rounds.append(bare_rows_per_s(bundle, x, best, args.seconds,
                                               result["bare_onnxruntime"]["best_threads"]))
            for name, srv in [("gateway", on), ("gateway_monitoring_off", off)]:
                rounds[name]["batched_npy"].append(asyncio.run(closed_loop(srv.base, req_batched, 8, args.seconds)))
                rounds[name]["single_npy"].append(asyncio.run(closed_loop(srv.base, req_single, args.concurrency,
                                                                          args.seconds)))
            for name, srv in [("gateway", on), ("torch_eager_bentoml", eager)]:
                json_rounds[name].append(asyncio.run(closed_loop(srv.base, req_single_json, args.concurrency,
                                                                 args.seconds)))
        extra: dict = {"single_json": {"rows_per_s": float(np.median([r["rows_per_s"] for r in json_rounds["gateway"]])),
                                       "rounds": json_rounds["gateway"]}}
        rate = 0.5 * float(np.median([r["requests_per_s"] for r in rounds["gateway"]["single_npy"]]))
        extra["moderate_load"] = asyncio.run(open_loop(on.base, req_single, rate, args.seconds))
    finally:
        on.stop()
        off.stop()
        eager.stop()
    for name in rounds:
        runs[name] = {}
        for kind, rs in rounds[name].items():
            med = float(np.median([r["rows_per_s"] for r in rs]))
            runs[name][kind] = {"rows_per_s": med, "rounds": rs}
    runs["gateway"].update(extra)
    ratios = {kind: [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(rounds["gateway"][kind],
                                                                        rounds["gateway_monitoring_off"][kind])]
              for kind in ("batched_npy", "single_npy")}
    runs["torch_eager_bentoml"] = {"single_json": {
        "rows_per_s": float(np.median([r["rows_per_s"] for r in json_rounds["torch_eager_bentoml"]])),
        "rounds": json_rounds["torch_eager_bentoml"]}}
    vs_torch = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(json_rounds["gateway"],
                                                                   json_rounds["torch_eager_bentoml"])]
    result["gateway_over_torch_per_round"] = vs_torch
    result["monitoring_ratio_per_round"] = ratios
    result["bare_onnxruntime"]["best_batch_rows_per_s_per_round"] = bare_rounds
    vs_bare = {kind: [a["rows_per_s"] / b for a, b in zip(rounds["gateway"][kind], bare_rounds)]
               for kind in ("batched_npy", "single_npy")}
    result["gateway_over_bare_per_round"] = vs_bare
    result["runs"] = runs

    print("load run ...", file=sys.stderr)
    srv = gateway(demo / "bundle", work, "load", args.workers, True)
    try:
        result["load_run"] = asyncio.run(load_run(srv, x, y, sites, manifest.classes, args.load_requests,
                                                  args.concurrency, args.load_warmup))
    finally:
        srv.stop()

    g = runs["gateway"]
    lr = result["load_run"]
    bars = {
        "gateway_vs_bare_onnxruntime_batched": float(np.median(vs_bare["batched_npy"])),
        "gateway_vs_bare_onnxruntime_single_row": float(np.median(vs_bare["single_npy"])),
        "gateway_vs_torch_eager_single_row_json": float(np.median(vs_torch)),
        "monitoring_on_over_off_batched": float(np.median(ratios["batched_npy"])),
        "monitoring_on_over_off_single_row": float(np.median(ratios["single_npy"])),
        "moderate_load_p50_ms": g["moderate_load"]["latency_ms_p50"],
        "moderate_load_p99_ms": g["moderate_load"]["latency_ms_p99"],
        "load_run_5xx": lr["responses_5xx"] + lr["client_errors"],
        "load_run_counters_exact": lr["counters"]["exact"],
        "load_run_rss_growth_mb": lr["rss_mb"]["growth_mb"],
    }
    bars["pass"] = {
        "throughput_vs_bare_ge_0.7 (batched requests)": bars["gateway_vs_bare_onnxruntime_batched"] >= 0.7,
        "throughput_vs_bare_ge_0.7 (single-row requests)": bars["gateway_vs_bare_onnxruntime_single_row"] >= 0.7,
        "throughput_vs_torch_eager_ge_2": bars["gateway_vs_torch_eager_single_row_json"] >= 2.0,
        "monitoring_overhead_le_15pct (batched)": bars["monitoring_on_over_off_batched"] >= 0.85,
        "monitoring_overhead_le_15pct (single-row)": bars["monitoring_on_over_off_single_row"] >= 0.85,
        "load_run_zero_5xx": bars["load_run_5xx"] == 0,
        "load_run_counters_exact": bool(lr["counters"]["exact"]),
        "load_run_rss_flat (growth < 5 %)": lr["rss_mb"]["growth_fraction"] < 0.05,
        "gpu_measured": gpu,
    }
    result["bars"] = bars
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(bars, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
