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
