"""Adaptive micro-batching across the concurrent requests of one worker.

BentoML's own ``batchable`` APIs merge requests before the handler sees them, so one bad
request would fail every request merged with it, and a handler cannot count per-row
monitoring with per-request ids. The gateway validates each request alone and then joins
the valid ones here: a batch starts with the first waiting request, takes every request
already queued, waits at most ``max_wait_s`` for more while it has fewer than ``max_rows``
rows, and runs on one executor thread (onnxruntime parallelises inside a run). While a
batch runs, new requests queue up, so batches grow with load and stay at one request when
idle — the same adaptive behaviour as BentoML's dispatcher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

__all__ = ["MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T]):
    payload: T
    rows: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """Runs ``run(list of payloads) -> list of results`` (same order) on batches of queued requests.

    A result that is an exception is raised to its own request only.

    ``max_rows``: rows per batch (a single larger request runs alone); ``max_wait_s``: how long
    a batch waits for company.
    """

    def __init__(self, run: Callable[[Sequence[T]], list[R]], max_rows: int, max_wait_s: float) -> None:
        self._run = run
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Item[T]] | None = None
        self._task: asyncio.Task | None = None
        self._pending: _Item[T] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hansgate-infer")
        self.batches_ = 0

    async def submit(self, payload: T, rows: int) -> R:
        """Queue one request's payload; returns its result (or raises its batch's error)."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._loop())
        fut: asyncio.Future = loop.create_future()
        await self._queue.put(_Item(payload, rows, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            first = self._pending or await queue.get()
            self._pending = None
            batch, rows = [first], first.rows
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_rows:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if rows + item.rows > self.max_rows:
                    self._pending = item
                    break
                batch.append(item)
                rows += item.rows
            live = [i for i in batch if not i.future.done()]  # a cancelled request needs no run
            if not live:
                continue
            try:
                results: Any = await loop.run_in_executor(self._executor, self._run, [i.payload for i in live])
            except Exception as exc:  # the batch's error goes to each of its requests
                for i in live:
                    if not i.future.done():
                        i.future.set_exception(exc)
            else:
                for i, r in zip(live, results):
                    if i.future.done():
                        continue
                    if isinstance(r, BaseException):  # one request's own refusal (e.g. its rows gave NaN)
                        i.future.set_exception(r)
                    else:
                        i.future.set_result(r)
            self.batches_ += 1

    async def aclose(self) -> None:
        """Stop the batching task (from its event loop)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            try:
                self._task.get_loop().call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # its loop is already closed
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)
