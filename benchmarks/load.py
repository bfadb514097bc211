"""Servers, load and CPU accounting shared by the serving benchmarks (``service_bench.py``,
``gateway_model_bench.py``; imported as ``load`` from beside them).

wrk drives a server over HTTP; the server's CPU time per request comes from /proc (the process
tree, and split by thread); bare onnxruntime loops are the anchor a served model is compared with.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WRK_SCRIPT = '''
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-npy"
local think = tonumber(os.getenv("THINK_MS") or "0")
if think > 0 then
  delay = function() return think end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"socket_errors\\":%d,"
    .. "\\"non_2xx\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


class Server:
    """A server process group with a bounded start; stopped with SIGTERM to the group (the arbiter
    of a BentoML server forwards it to its workers), SIGKILL after 30 s."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, port: int, log: Path,
                 ready: str) -> None:
        import httpx

        self.name, self.port, self.base = name, port, f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.base + ready, timeout=2).status_code in (200, 405):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} not ready in 240 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def base_env(work: Path, name: str) -> dict[str, str]:
    env = dict(os.environ, BENTOML_HOME=str(work / f"bentoml-{name}"), BENTOML_DO_NOT_TRACK="True",
               PYTHONPATH=str(ROOT))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def start_gateway(bundle: Path, work: Path, name: str, workers: int, monitoring: bool,
                  extra_env: dict[str, str] | None = None) -> Server:
    port = free_port()
    env = base_env(work, name) | (extra_env or {}) | {"HANSGATE_STATE_DIR": str(work / f"state-{name}"),
                                  "HANSGATE_MONITORING": "1" if monitoring else "0", "HANSGATE_PROVIDER": "cpu",
                                  "HANSGATE_ORT_THREADS": "1", "HANSGATE_MAX_CONCURRENCY": "1024",
                                  "HANSGATE_MICROBATCH_ROWS": "64"}
    argv = [sys.executable, "-m", "hansgate.cli", "serve", str(bundle), "--port", str(port), "--host", "127.0.0.1",
            "--workers", str(workers)]
    return Server(name, argv, env, ROOT, port, work / f"{name}.log", "/readyz")


def _proc_stat(path: Path) -> tuple[str, int, float] | None:
    """``(comm, ppid, user + system CPU seconds)`` from a /proc ``stat`` file (``None`` when it is gone)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "(comm)": state ppid ... utime stime
    return (text[text.index("(") + 1:text.rindex(")")], int(fields[1]),
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))


def tree_pids(root: int) -> list[int]:
    """Process ``root`` and all its live descendants (Linux /proc; BentoML starts its workers in sessions of
    their own, so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        info = _proc_stat(stat)
        if info is not None:
            children.setdefault(info[1], []).append(int(stat.parent.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of process ``root`` and all its live descendants."""
    return sum(info[2] for pid in tree_pids(root) if (info := _proc_stat(Path(f"/proc/{pid}/stat"))) is not None)


def cpu_by_thread(root: int) -> dict[str, float]:
    """CPU seconds of the threads of ``root`` and its descendants, by role: the gateway names its threads
    in the kernel (``service.threads``: ``hansgate-infer``, ``hansgate-decode``, ``hansgate-io``); each
    process's main thread runs its event loop; everything else (onnxruntime's, anyio's) is ``other``."""
    roles: dict[str, float] = {}
    for pid in tree_pids(root):
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            info = _proc_stat(stat)
            if info is None:
                continue
            comm, tid = info[0], int(stat.parent.name)
            role = comm if comm.startswith("hansgate-") else "main (event loop)" if tid == pid else "other"
            roles[role] = roles.get(role, 0.0) + info[2]
    return roles


def wrk(base: str, body_file: Path, seconds: float, connections: int, script: Path, think_ms: float = 0.0,
        warmup_s: float = 1.0, cpu_root: int | None = None) -> dict:
    """One wrk run (after a short warm-up run); requests/s, non-2xx, socket errors, latency percentiles;
    with ``cpu_root``, also the CPU of that process and its descendants, in milliseconds per request during the run."""
    env = dict(os.environ, BODY_FILE=str(body_file), THINK_MS=f"{think_ms:.3f}")
    if warmup_s > 0:
        subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{warmup_s:.0f}s", "-s", str(script),
                        f"{base}/predict"], env=env, capture_output=True, timeout=60)
    cpu0 = tree_cpu_s(cpu_root) if cpu_root is not None else 0.0
    threads0 = cpu_by_thread(cpu_root) if cpu_root is not None else {}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "10s", "-s",
                          str(script), f"{base}/predict"], env=env, capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    m = re.search(r"WRKJSON (\{.*\})", out)
    if m is None:
        raise RuntimeError(f"wrk gave no summary:\n{out}")
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    run = {"requests_per_s": r["requests"] / secs, "requests": r["requests"], "seconds": secs,
           "non_2xx": r["non_2xx"], "socket_errors": r["socket_errors"], "connections": connections,
           "think_ms": think_ms, "latency_ms_p50": r["p50_us"] / 1e3, "latency_ms_p90": r["p90_us"] / 1e3,
           "latency_ms_p99": r["p99_us"] / 1e3, "latency_ms_max": r["max_us"] / 1e3}
    if cpu_root is not None:
        run["server_cpu_ms_per_request"] = (tree_cpu_s(cpu_root) - cpu0) * 1e3 / max(1, r["requests"])
        run["server_cpu_ms_per_request_by_thread"] = {
            role: (cpu - threads0.get(role, 0.0)) * 1e3 / max(1, r["requests"])
            for role, cpu in sorted(cpu_by_thread(cpu_root).items())}
    return run


BARE = '''
import sys, time, numpy as np, onnxruntime as ort
path, batch, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.enable_mem_pattern = sys.argv[4] == "1"
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random((batch, *[d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape[1:]]),
                                    dtype=np.float32)
s.run(None, {"input": x})
n, t0, c0 = 0, time.perf_counter(), time.process_time()
while time.perf_counter() - t0 < seconds:
    s.run(None, {"input": x}); n += batch
print(n / (time.perf_counter() - t0), (time.process_time() - c0) / (n / batch))
'''


def bare_onnxruntime(onnx: Path, batch: int, seconds: float, processes: int,
                     memory_patterns: bool = True) -> tuple[float, float]:
    """Rows/s of ``processes`` bare loops (one thread each) at ``batch``, all at once (summed), and the
    mean CPU milliseconds of one run. ``memory_patterns``: onnxruntime's default (on); the gateway's is off."""
    procs = [subprocess.Popen([sys.executable, "-c", BARE, str(onnx), str(batch), str(seconds),
                               "1" if memory_patterns else "0"],
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [p.communicate(timeout=seconds + 120)[0].split() for p in procs]
    return float(sum(float(o[0]) for o in outs)), 1e3 * float(np.mean([float(o[1]) for o in outs]))


def bracketed(onnx: Path, seconds: float, processes: int, measure: Callable[[], dict]) -> tuple[dict, dict[str, float]]:
    """``measure()`` (a gateway's 64-row run) between two bare onnxruntime runs at batch 64: its result, and the
    anchors under the keys the results use. Rows/s and CPU per run are the means of the run before and the run
    after (a shared machine's speed drifts within a round; a drift linear in time cancels), both kept; CPU per run
    with the gateway's session options (memory patterns off), run last, says how much of a gap is that setting."""
    before = bare_onnxruntime(onnx, 64, seconds, processes)
    result = measure()
    after = bare_onnxruntime(onnx, 64, seconds, processes)
    return result, {"bare_onnxruntime_batch64_rows_per_s": (before[0] + after[0]) / 2,
                    "bare_onnxruntime_cpu_ms_per_batch64": (before[1] + after[1]) / 2,
                    "bare_onnxruntime_rows_per_s_before_after": [before[0], after[0]],
                    "bare_onnxruntime_cpu_ms_before_after": [before[1], after[1]],
                    "bare_onnxruntime_gateway_options_cpu_ms_per_batch64":
                        bare_onnxruntime(onnx, 64, seconds, processes, memory_patterns=False)[1]}


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def batch64_gap(rounds: list[dict]) -> dict[str, float]:
    """Where the gateway's CPU per 64-row request goes beyond bare onnxruntime's run (medians over rounds,
    milliseconds; the parts add up to the gap): onnxruntime's memory patterns (bare with the gateway's
    session options minus bare), the rest of the inference thread (its CPU minus that bare run: Python
    after each run, hand-offs, colder caches), the event loop (HTTP, body, reply) and the other threads."""
    def part(f) -> float:
        return median([f(r) for r in rounds])

    def role(r: dict, name: str) -> float:
        return r["batch64"]["gateway"]["server_cpu_ms_per_request_by_thread"].get(name, 0.0)

    infer = "hansgate-infer"
    return {
        "gateway_minus_bare_ms": part(lambda r: r["batch64"]["gateway"]["server_cpu_ms_per_request"]
                                     - r["bare_onnxruntime_cpu_ms_per_batch64"]),
        "memory_patterns_ms": part(lambda r: r["bare_onnxruntime_gateway_options_cpu_ms_per_batch64"]
                                   - r["bare_onnxruntime_cpu_ms_per_batch64"]),
        "inference_thread_beyond_onnxruntime_ms": part(
            lambda r: role(r, infer) - r["bare_onnxruntime_gateway_options_cpu_ms_per_batch64"]),
        "event_loop_ms": part(lambda r: role(r, "main (event loop)")),
        "other_threads_ms": part(lambda r: sum(v for k, v in r["batch64"]["gateway"]
                                               ["server_cpu_ms_per_request_by_thread"].items()
                                               if k not in (infer, "main (event loop)"))),
    }
