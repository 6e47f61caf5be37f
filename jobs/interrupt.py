"""Ctrl-C and SIGTERM for a job: the first signal becomes :class:`supersub.runner.Interrupted`
in the main thread, so the job unwinds as one exception — the runner starts no new task and its
running ones stop, the tracker ends every run of the job KILLED, and the entry point prints one
line and exits 130 (SIGINT) or 143 (SIGTERM). Signals that arrive while it unwinds are ignored
(the unwinding is short and marks the MLflow runs); the third one exits at once.

``ray.init`` installs its own SIGTERM handler in the driver (``sys.exit``; a local head's
handler kills the node and exits 1), which would skip all of that: call :func:`reclaim_signals`
after it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from supersub.runner import Interrupted


@contextlib.contextmanager
def signals_interrupt(prog: str) -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Interrupted` inside the block (main thread only)."""
    received: list[int] = []

    def handler(signum, frame) -> None:
        received.append(signum)
        if len(received) == 1:
            raise Interrupted(signum)
        if len(received) >= 3:
            print(f"{prog}: {signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + received[0])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _active.append(handler)
    try:
        yield
    finally:
        _active.remove(handler)
        for s, h in previous.items():
            signal.signal(s, h)


_active: list = []  # the handler of the innermost signals_interrupt block


def reclaim_signals() -> None:
    """Re-installs the active block's handler for SIGINT and SIGTERM (after ``ray.init``)."""
    if _active and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _active[-1])


def interrupted_line(prog: str, e: Interrupted) -> str:
    return (f"{prog}: interrupted ({e}): no task started after it, the running ones were stopped; finished tasks "
            "and checkpoints are kept — rerun with the same --out to continue")
