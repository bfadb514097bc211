"""``hansgate serve BUNDLE``: check every setting and the bundle, then become ``bentoml serve``.

All checks happen before BentoML starts, so a bad setting or bundle is one line and exit
code 2 rather than a worker restarted every few seconds: every ``HANSGATE_*`` variable
(``service.config.check_environment``), the provider (``HANSGATE_PROVIDER=cuda`` needs
onnxruntime's CUDA provider and a visible device), and the bundle (with its signature when
``HANSGATE_PUBLIC_KEY`` is set). Then the process *replaces itself* with ``bentoml serve``
(``os.execve``): signals sent to ``hansgate serve`` reach BentoML's arbiter directly, so
SIGTERM stops the server the way Kubernetes expects: each worker stops accepting, lets
in-flight requests finish for at most ``HANSGATE_GRACE_S`` seconds, and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP with monitoring (BentoML + onnxruntime)",
                       description="Verifies BUNDLE (hashes, schema version, graph outputs, and the signature when "
                                   "HANSGATE_PUBLIC_KEY is set) and every HANSGATE_* setting, then starts the gateway: "
                                   "POST /predict, POST /feedback, GET /compliance, /metrics, /livez, /readyz. "
                                   "Other settings come from HANSGATE_* environment variables (service/config.py). "
                                   "SIGTERM drains in-flight requests for at most HANSGATE_GRACE_S seconds (20).")
    p.add_argument("bundle", help="bundle directory (model.onnx + manifest.json)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.set_defaults(run=run)


def command(bundle: Path, port: int, host: str, workers: int, grace_s: int = 20) -> tuple[list[str], dict[str, str]]:
    """The ``bentoml serve`` command line and environment that ``run`` executes."""
    env = dict(os.environ, HANSGATE_BUNDLE=str(bundle.resolve()), HANSGATE_WORKERS=str(workers))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-m", "bentoml", "serve", "hansgate.service.service:Gateway", "--port", str(port),
            "--host", host, "--working-dir", root, "--timeout-graceful-shutdown", str(grace_s)]
    return argv, env


def check_provider(preference: str) -> None:
    """Refuse ``HANSGATE_PROVIDER=cuda`` where onnxruntime has no CUDA provider or no device is visible."""
    if preference != "cuda":
        return
    import onnxruntime as ort

    from hansgate.service.runtime import cuda_device_count, select_providers

    select_providers("cuda", ort.get_available_providers(), cuda_device_count())


def run(args: argparse.Namespace) -> int:
    from hansgate.bundle import load_bundle
    from hansgate.errors import BundleError, ConfigError
    from hansgate.service.config import check_environment

    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if not 0 < args.port < 65536:
        raise ConfigError("--port must be in 1..65535")
    bundle_path = Path(args.bundle)
    if not bundle_path.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_path}")
    argv, env = command(bundle_path, args.port, args.host, args.workers)
    cfg, options = check_environment(env)  # every HANSGATE_* setting, as the workers will read them
    check_provider(cfg.provider)
    bundle = load_bundle(cfg.bundle, public_key=cfg.public_key)  # one line here, before any worker starts
    argv, env = command(bundle.path, args.port, args.host, args.workers, options.grace_s)
    signed = f", signed by key {bundle.signed_by}" if bundle.signed_by else ""
    print(f"hansgate: serving {bundle.path} ({bundle.manifest.method.name}, sha256 "
          f"{bundle.manifest.graph.sha256[:12]}...{signed}) on http://{args.host}:{args.port} with {args.workers} "
          f"worker(s)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)  # never returns: this process becomes BentoML's arbiter
