"""hansgate.service.threads: the kernel sees the gateway's threads by name (top -H, /proc)."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from hansgate.service.batching import MicroBatcher
from hansgate.service.threads import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names via /proc are Linux's")


def _comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def _named_in_thread(name: str) -> tuple[bool, str]:
    out: list = []

    def body() -> None:
        ok = name_os_thread(name)
        out.append((ok, _comm(threading.get_native_id())))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out[0]


def test_names_the_calling_thread_only():
    before = _comm(threading.get_native_id())
    assert _named_in_thread("hansgate-x") == (True, "hansgate-x")
    assert _comm(threading.get_native_id()) == before  # the caller's own name is untouched


def test_long_names_are_cut_to_the_kernels_15_bytes():
    assert _named_in_thread("hansgate-decode-pool-7") == (True, "hansgate-decode")


def test_the_batchers_inference_thread_is_named():
    seen: list[str] = []

    def run(payloads):
        seen.append(_comm(threading.get_native_id()))
        return payloads

    async def main() -> None:
        b = MicroBatcher(run, max_rows=4, max_wait_s=0.0)
        assert await b.submit("x", 1) == "x"
        await b.aclose()

    asyncio.run(main())
    assert seen == ["hansgate-infer"]
