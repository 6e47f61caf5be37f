"""serve.batching.Batcher: no wait when idle, everything that queued as one batch under load."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve.batching import Batcher


def _recording(delay_s: float = 0.0, gate: threading.Event | None = None):
    batches: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        batches.append(list(items))
        if gate is not None and len(batches) == 1:
            gate.wait(5)  # the first batch holds the model until the test lets it go
        time.sleep(delay_s)
        return [i * 10 for i in items]

    return fn, batches


def test_an_idle_batcher_runs_a_request_at_once() -> None:
    fn, batches = _recording()
    b = Batcher(fn, max_batch_size=16, wait_ms=0)

    async def main() -> list[float]:
        took = []
        for i in range(5):
            t0 = time.perf_counter()
            assert await b.submit(i) == i * 10
            took.append(time.perf_counter() - t0)
        return took

    took = asyncio.run(main())
    assert batches == [[0], [1], [2], [3], [4]]
    assert max(took) < 0.05  # no batching wait (a thread hop is ~0.1 ms)


def test_what_queued_while_busy_is_the_next_batch_up_to_the_limit() -> None:
    gate = threading.Event()
    fn, batches = _recording(gate=gate)
    b = Batcher(fn, max_batch_size=4, wait_ms=0)

    async def main() -> list[int]:
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # the first batch [0] is running and holds the model
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [i * 10 for i in range(7)]
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert (b.batches, b.requests) == (3, 7)


def test_wait_ms_collects_requests_that_arrive_within_it() -> None:
    fn, batches = _recording()
    b = Batcher(fn, max_batch_size=8, wait_ms=200)

    async def main() -> None:
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.02)
        await asyncio.gather(first, b.submit(1))

    asyncio.run(main())
    assert batches == [[0, 1]]


def test_an_error_fails_its_batch_and_the_batcher_lives_on() -> None:
    def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    b = Batcher(fn)

    async def main() -> int:
        with pytest.raises(ValueError, match="unlucky"):
            await b.submit(13)
        return await b.submit(1)

    assert asyncio.run(main()) == 1


def test_a_wrong_number_of_results_is_an_error() -> None:
    b = Batcher(lambda items: items[:-1])

    async def main() -> None:
        await b.submit(1)

    with pytest.raises(RuntimeError, match="0 results for 1"):
        asyncio.run(main())


def test_a_cancelled_request_is_dropped_from_its_batch() -> None:
    gate = threading.Event()
    fn, batches = _recording(gate=gate)
    b = Batcher(fn, max_batch_size=8)

    async def main() -> None:
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)
        gone, kept = asyncio.ensure_future(b.submit(1)), asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client went away while it queued
        gate.set()
        assert await asyncio.gather(first, kept) == [0, 20]

    asyncio.run(main())
    assert batches == [[0], [2]]


@pytest.mark.parametrize("size,wait", [(0, 0.0), (4, -1.0), (4, float("nan"))])
def test_bad_settings_are_refused(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        Batcher(lambda items: items, size, wait)


def test_coalescer_calls_at_once_when_idle_and_coalesces_per_key_under_load() -> None:
    """The per-stage graph's hops to the specialists: a call per key starts at once while
    fewer than `limit` are in flight; what arrives meanwhile goes in one call; keys apart."""
    from serve.batching import Coalescer

    calls: list[tuple[str, list[int]]] = []

    async def main() -> list[int]:
        gate = asyncio.Event()

        async def fn(key: str, items: list[int]) -> list[int]:
            calls.append((key, list(items)))
            await gate.wait()
            if -1 in items:
                raise ValueError("bad item")
            return [i * 10 for i in items]

        c = Coalescer(fn, limit=1, max_items=3)
        first = [asyncio.ensure_future(c.submit("a", 0)), asyncio.ensure_future(c.submit("b", 100))]
        await asyncio.sleep(0.01)
        assert calls == [("a", [0]), ("b", [100])]  # nothing waited for company
        rest = [asyncio.ensure_future(c.submit("a", i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        gate.set()
        out = await asyncio.gather(*first, *rest)
        bad = await asyncio.gather(c.submit("a", -1), return_exceptions=True)
        assert isinstance(bad[0], ValueError)
        assert await c.submit("a", 7) == 70  # it lives on
        return out

    assert asyncio.run(main()) == [0, 1000, 10, 20, 30, 40, 50]
    assert calls[:4] == [("a", [0]), ("b", [100]), ("a", [1, 2, 3]), ("a", [4, 5])]
