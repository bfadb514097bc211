"""``hansgate serve BUNDLE``: verify the bundle, then run the gateway with ``bentoml serve``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP with monitoring (BentoML + onnxruntime)",
                       description="Verifies BUNDLE (hashes, schema version, graph outputs) and starts the gateway: "
                                   "POST /predict, POST /feedback, GET /compliance, /metrics, /livez, /readyz. "
                                   "Other settings come from HANSGATE_* environment variables (service/config.py).")
    p.add_argument("bundle", help="bundle directory (model.onnx + manifest.json)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.set_defaults(run=run)


def command(bundle: Path, port: int, host: str, workers: int) -> tuple[list[str], dict[str, str]]:
    """The ``bentoml serve`` command line and environment that ``run`` executes."""
    env = dict(os.environ, HANSGATE_BUNDLE=str(bundle.resolve()), HANSGATE_WORKERS=str(workers))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-m", "bentoml", "serve", "hansgate.service.service:Gateway", "--port", str(port),
            "--host", host, "--working-dir", root]
    return argv, env


def run(args: argparse.Namespace) -> int:
    from hansgate.bundle import load_bundle
    from hansgate.errors import ConfigError

    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if not 0 < args.port < 65536:
        raise ConfigError("--port must be in 1..65535")
    bundle = load_bundle(args.bundle)  # refuse a bad bundle here, with one line, before any worker starts
    argv, env = command(bundle.path, args.port, args.host, args.workers)
    print(f"hansgate: serving {bundle.path} ({bundle.manifest.method.name}, sha256 "
          f"{bundle.manifest.graph.sha256[:12]}...) on http://{args.host}:{args.port} with {args.workers} worker(s)",
          file=sys.stderr)
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        raise
