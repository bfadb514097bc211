"""hansgate.service.service: which of BentoML's layers the gateway's own routes pass through.

Importing the service patches BentoML process-wide, so the check runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import asyncio
import contextlib
import hansgate.service.service as service
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from _bentoml_impl.server.app import ContextMiddleware

seen = []

class Context:  # BentoML's ServiceContext, as far as its ContextMiddleware uses it
    @contextlib.contextmanager
    def in_request(self, request):
        yield

async def inner(scope, receive, send):  # what BentoML's routing would reach
    seen.append(("routed", scope["path"]))

async def fast(scope, receive, send):
    seen.append(("fast", scope["path"]))

class Cors:  # any middleware configured between BentoML's timeout and its request context
    def __init__(self, app):
        self.app = app
    async def __call__(self, scope, receive, send):
        seen.append(("cors", scope["path"]))
        await self.app(scope, receive, send)

service.app.fast_routes[("POST", "/predict")] = fast
plain = TimeoutMiddleware(ContextMiddleware(inner, context=Context()), timeout=5)
with_cors = TimeoutMiddleware(Cors(ContextMiddleware(inner, context=Context())), timeout=5)

async def nothing():
    return {"type": "http.disconnect"}

async def drop(message):
    pass

def call(mw, method, path):
    seen.clear()
    asyncio.run(mw({"type": "http", "method": method, "path": path, "headers": []}, nothing, drop))
    return list(seen)

print(call(plain, "POST", "/predict"))
print(call(with_cors, "POST", "/predict"))
print(call(plain, "GET", "/readyz"))
'''


def test_own_routes_skip_only_what_the_gateway_does_not_use(tmp_path):
    """/predict goes straight to the gateway's handler under BentoML's plain stack, through any
    configured middleware (CORS) otherwise, and other routes keep BentoML's full path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="True")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines[0] == "[('fast', '/predict')]"
    assert lines[1] == "[('cors', '/predict'), ('routed', '/predict')]"
    assert lines[2] == "[('routed', '/readyz')]"
