"""A plain-text progress bar and an order-keeping process pool for builds and decodes.

No tqdm: on a TTY the bar is one ``\\r``-rewritten line (count, rate, ETA); in a log file (stderr
not a TTY) it prints a line at every 10 % instead, so CI logs stay short.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``Progress(total, "verify")``; ``update(n)`` after each chunk; ``close()`` at the end."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.total, self.label, self.enabled = max(total, 0), label, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.start = 0, time.monotonic()
        self._last_draw, self._last_decile = 0.0, 0

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (
            f"{self.label}: {self.done}/{self.total} ({pct:3.0f}%) {rate:,.0f}/s "
            f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}"
        )

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.2 or self.done >= self.total:
                self.stream.write("\r" + self._line() + "\033[K")
                self.stream.flush()
                self._last_draw = now
        else:
            decile = int(10 * self.done / self.total) if self.total else 10
            if decile > self._last_decile and decile < 10:
                self._last_decile = decile
                print(self._line(), file=self.stream, flush=True)

    def close(self) -> float:
        """Ends the bar; returns the elapsed seconds."""
        elapsed = time.monotonic() - self.start
        if self.enabled:
            end = "\r" + self._line() + "\033[K\n" if self.tty else self._line() + "\n"
            self.stream.write(end)
            self.stream.flush()
        return elapsed


def _context() -> Any:
    # fork: workers start in milliseconds and inherit the imported modules; the workers only run
    # PIL/pyarrow/numpy code, never torch ops, so torch's thread pools are not a fork hazard here.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    sizes: Callable[[T, R], int] | None = None,
    progress: Progress | None = None,
) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes, results in order, progress updated per item.

    ``fn`` must be a module-level function (picklable); ``sizes(item, result)`` says how many
    units (e.g. images) an item counts for on the progress bar (default 1).
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        results: Iterable[R] = map(fn, items)
        pool = None
    else:
        pool = _context().Pool(min(workers, len(items)))
        results = pool.imap(fn, items)
    finished = False
    try:
        for item, result in zip(items, results):
            if progress is not None:
                progress.update(sizes(item, result) if sizes else 1)
            yield result
        finished = True
    finally:
        if pool is not None:
            # terminate on an error or an abandoned generator, so no worker outlives the build
            pool.close() if finished else pool.terminate()
            pool.join()
