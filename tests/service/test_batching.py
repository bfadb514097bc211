"""hansgate.service.batching: concurrent requests are joined, results go back in order, errors to their batch."""

from __future__ import annotations

import asyncio

import pytest

from hansgate.service.batching import MicroBatcher


def test_joins_concurrent_requests_and_keeps_order():
    seen: list[int] = []

    def run(payloads):
        seen.append(sum(len(p) for p in payloads))
        return [[v * 2 for v in p] for p in payloads]

    async def main():
        b = MicroBatcher(run, max_rows=8, max_wait_s=0.05)
        out = await asyncio.gather(*[b.submit([i, i], 2) for i in range(10)])
        b.close()
        return out

    out = asyncio.run(main())
    assert out == [[2 * i, 2 * i] for i in range(10)]
    assert sum(seen) == 20 and max(seen) <= 8 and len(seen) < 10  # batched, never over the limit


def test_full_requests_run_at_once_alone_and_merge_when_they_queue():
    """fill_rows 4, max_rows 8, a 5 s wait: a lone 4-row request runs at once; 4-row requests queued
    behind a running batch merge two by two."""
    import threading
    import time

    gate = threading.Event()
    seen: list[int] = []

    def run(payloads):
        gate.wait(10)
        seen.append(sum(len(p) for p in payloads))
        return payloads

    async def main():
        b = MicroBatcher(run, max_rows=8, max_wait_s=5.0, fill_rows=4)
        gate.set()
        t0 = time.monotonic()
        await b.submit([0] * 4, 4)
        lone = time.monotonic() - t0
        gate.clear()
        first = asyncio.ensure_future(b.submit([1] * 4, 4))  # runs alone and blocks on the gate
        while not seen and b._items:  # wait until the thread took it
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit([i] * 4, 4)) for i in range(2, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *rest)
        b.close()
        return lone

    lone = asyncio.run(main())
    assert lone < 2.0  # no 5 s wait for company
    assert seen == [4, 4, 8, 8]


def test_error_reaches_only_its_batch():
    def run(payloads):
        if any(p == "bad" for p in payloads):
            raise ValueError("boom")
        return payloads

    async def main():
        b = MicroBatcher(run, max_rows=1, max_wait_s=0.0)
        good = await b.submit("ok", 1)
        with pytest.raises(ValueError):
            await b.submit("bad", 1)
        after = await b.submit("again", 1)  # the batcher survives the error
        b.close()
        return good, after

    assert asyncio.run(main()) == ("ok", "again")
