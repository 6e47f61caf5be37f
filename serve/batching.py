"""Opportunistic batching for the model deployments: never wait when idle, batch under load.

``@serve.batch`` forms the next batch while the current one runs (Ray 2.60,
``_BatchQueue._process_batches``): with no wait it runs batches of one back to back behind its
semaphore, so concurrent requests never share a forward; with a wait, every request — the lone
one at concurrency 1 included — pays that wait first. Measured with benchmarks/serve_load.py
(docs/benchmarks.md): a 2 ms wait costs ~2 ms at c = 1; no wait costs a third of the
throughput at c = 8.

:class:`Batcher` forms a batch when the model is free instead: everything that queued while the
previous batch ran, up to ``max_batch_size`` requests. An idle replica runs a request at once; a
busy one batches as deep as its load (what Triton calls dynamic batching with no queue delay).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Batcher:
    """``await submit(item)`` → ``fn(items)[i]``, ``fn`` called on batches in one worker thread.

    ``fn`` takes a list of items and returns one result per item, in order; it runs in a thread
    of its own, off the event loop (the replica keeps answering /healthz and reading bodies
    while it computes).
    ``wait_ms`` > 0 waits up to that long after a batch's first request for more, trading
    latency for fuller batches. A request cancelled while it waits (its client went away) is
    dropped from its batch. An exception from ``fn`` fails every request of that batch.
    """

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch_size: int = 16, wait_ms: float = 0.0) -> None:
        if max_batch_size < 1 or not wait_ms >= 0:
            raise ValueError(f"max_batch_size must be >= 1 and wait_ms >= 0, got {max_batch_size}, {wait_ms}")
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_ms / 1000
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        # One thread: batches run one after another, as on one device.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self.batches = self.requests = 0  # for tests and metrics: mean batch = requests / batches

    async def submit(self, item: Any) -> Any:
        if self._worker is None or self._worker.done():  # created on the replica's own event loop
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return await fut

    async def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.done()]  # done: cancelled by its caller

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._thread, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # noqa: BLE001 - the batch's callers get the error, the worker lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches, self.requests = self.batches + 1, self.requests + len(batch)
            for (_, fut), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)


class Coalescer:
    """``await submit(key, item)`` → ``(await fn(key, items))[i]``: calls to another deployment,
    coalesced per key. A call for a key starts at once while fewer than ``limit`` calls for it
    are in flight; items that arrive meanwhile go together in the next one (at most
    ``max_items``). What :class:`Batcher` does for a forward, for a handle hop: at concurrency 1
    nothing waits; under load one hop carries many requests' items.

    ``fn`` is a coroutine function returning one result per item, in order; its exception fails
    every item of that call.
    """

    def __init__(self, fn: Callable[[Any, list[Any]], Any], limit: int = 2, max_items: int = 64) -> None:
        if limit < 1 or max_items < 1:
            raise ValueError(f"limit and max_items must be >= 1, got {limit}, {max_items}")
        self.fn, self.limit, self.max_items = fn, limit, max_items
        self._pending: dict[Any, list[tuple[Any, asyncio.Future]]] = {}
        self._running: dict[Any, int] = {}
        self.calls = self.items = 0  # for tests and metrics: items per hop = items / calls

    async def submit(self, key: Any, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((item, fut))
        if self._running.get(key, 0) < self.limit:
            self._start(key)
        return await fut

    def _start(self, key: Any) -> None:
        queued = self._pending.get(key, [])
        batch, rest = queued[: self.max_items], queued[self.max_items:]
        if rest:
            self._pending[key] = rest
        else:
            self._pending.pop(key, None)
        batch = [(item, fut) for item, fut in batch if not fut.done()]  # done: cancelled by its caller
        if not batch:
            return
        self._running[key] = self._running.get(key, 0) + 1
        asyncio.get_running_loop().create_task(self._call(key, batch))

    async def _call(self, key: Any, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self.fn(key, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"call returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # noqa: BLE001 - the call's items get the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
        else:
            self.calls, self.items = self.calls + 1, self.items + len(batch)
            for (_, fut), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)
        finally:
            self._running[key] -= 1
            if self._pending.get(key):
                self._start(key)
