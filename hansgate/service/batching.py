"""Adaptive micro-batching across the concurrent requests of one worker.

BentoML's own ``batchable`` APIs merge requests before the handler sees them, so one bad
request would fail every request merged with it, and a handler cannot count per-row
monitoring with per-request ids. The gateway validates each request alone and then joins
the valid ones here.

One inference thread per worker forms each batch at the moment it becomes free: it takes
every request waiting (up to ``max_rows`` rows), waits at most ``max_wait_s`` for more while
it has fewer than ``fill_rows`` rows, runs the batch (onnxruntime releases the GIL and
parallelises inside a run) and hands each request its result on its event loop. Forming the batch in the thread
rather than on the event loop leaves no gap between runs under load (the next batch is
whatever queued during the last one), and batches stay at one request when idle.

``fill_rows`` below ``max_rows`` lets requests that are each a full batch still merge when they
queue up (the costs paid once per batch are then shared), without making a lone one wait.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from hansgate.service.threads import name_os_thread

__all__ = ["MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T]):
    payload: T
    rows: int
    future: asyncio.Future = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """Runs ``run(list of payloads) -> list of results`` (same order) on batches of queued requests.

    ``max_rows``: rows per batch (a single larger request runs alone); ``max_wait_s``: how long
    a batch with fewer than ``fill_rows`` rows (default ``max_rows``) waits for company. A result
    that is an exception is raised to its own request only; an exception from ``run`` goes to
    every request of that batch.
    """

    def __init__(self, run: Callable[[Sequence[T]], list[R]], max_rows: int, max_wait_s: float,
                 fill_rows: int | None = None) -> None:
        self._run = run
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.fill_rows = max_rows if fill_rows is None else min(fill_rows, max_rows)
        self._items: deque[_Item[T]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches_ = 0

    async def submit(self, payload: T, rows: int) -> R:
        """Queue one request's payload; returns its result (or raises its batch's error)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="hansgate-infer", daemon=True)
                self._thread.start()
            self._items.append(_Item(payload, rows, fut, loop))
            self._cond.notify()
        return await fut

    def _next_batch(self) -> list[_Item[T]] | None:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._items.popleft()
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_rows:
                if self._items:
                    if rows + self._items[0].rows > self.max_rows:
                        break
                    item = self._items.popleft()
                    batch.append(item)
                    rows += item.rows
                    continue
                if rows >= self.fill_rows:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _serve(self) -> None:
        name_os_thread("hansgate-infer")
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [i for i in batch if not i.future.cancelled()]  # a cancelled request needs no run
            if not live:
                continue
            outcome: Any
            try:
                outcome = self._run([i.payload for i in live])
            except Exception as exc:  # the batch's error goes to each of its requests
                outcome = exc
            self.batches_ += 1
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item[T], Any]]] = {}
            for k, item in enumerate(live):
                by_loop.setdefault(item.loop, []).append((item, outcome if isinstance(outcome, Exception)
                                                          else outcome[k]))
            for loop, pairs in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, pairs)
                except RuntimeError:  # that loop is closed: nobody waits for these results
                    pass

    async def aclose(self) -> None:
        """Stop the inference thread (from an event loop; waits for it off the loop)."""
        self.close()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        for item in pending:
            try:
                item.loop.call_soon_threadsafe(_deliver, [(item, RuntimeError("the gateway is shutting down"))])
            except RuntimeError:
                pass


def _deliver(pairs: list[tuple[_Item, Any]]) -> None:
    """Set each request's result or exception (on its event loop)."""
    for item, result in pairs:
        if item.future.done():
            continue
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)
