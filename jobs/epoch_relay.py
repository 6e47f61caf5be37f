"""Per-epoch rows from Ray Train runs to the driver, so that only the driver talks to the tracker.

A Train worker may run on any node, where the tracking store's address may mean nothing (a
SQLite file is node-local) and its credentials are absent. So workers only ``ray.train.report``
their rows; :class:`EpochRelay`, a Train callback, runs in each run's controller (which Train
places on the driver's node) and puts rank 0's row on one queue; :class:`EpochPump`, a thread in
the driver, takes them off and hands each to its task's logger — Ray's own MLflow callbacks
work the same way. A row that cannot be relayed (the queue is gone with the driver) is dropped
with a line: tracking never fails a training run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import ray
import ray.train
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class EpochRelay(ray.train.UserCallback):
    """Puts every epoch row that rank 0 reports on ``queue`` as ``(key, row)``; the final
    report (``"final"`` in it: the task's outputs) is not an epoch."""

    def __init__(self, rows: Queue, key: str) -> None:
        self.rows, self.key = rows, key

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        row = metrics[0] if metrics else {}
        if not row or "final" in row:
            return
        try:
            self.rows.put((self.key, dict(row)), timeout=30)
        except Exception as e:  # noqa: BLE001 - a lost row must not fail the training run
            print(f"{self.key}: an epoch row was not relayed to the driver ({type(e).__name__}: {e})", flush=True)


class EpochPump:
    """The driver's end: a thread that hands each relayed row to the callback registered for its
    key. :meth:`flush` delivers every row already queued before it returns, so a task's run gets
    its last epoch before its final numbers."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        here = ray.get_runtime_context().get_node_id()
        # No CPU (a full cluster must still place it) and on the driver's node (it dies with the
        # driver, not with a worker node).
        self.rows = Queue(actor_options={"num_cpus": 0,
                                         "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)})
        self.log = log
        self._sinks: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._lock = threading.Lock()  # held while a row is taken and delivered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="epoch-pump", daemon=True)
        self._thread.start()

    def relay(self, key: str, sink: Callable[[dict[str, Any]], None]) -> EpochRelay:
        """The Train callback for one run whose rows go to ``sink``."""
        self._sinks[key] = sink
        return EpochRelay(self.rows, key)

    def flush(self) -> None:
        with self._lock:
            try:
                pending = self.rows.get_nowait_batch(self.rows.qsize())
            except Exception:  # noqa: BLE001 - the queue went with a Ray shutdown
                return
            for item in pending:
                self._deliver(item)

    def close(self) -> None:
        """Delivers what is queued, then stops the thread and the queue."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        try:
            ray.kill(self.rows.actor)
        except Exception:  # noqa: BLE001 - already gone with Ray
            pass

    def _pump(self) -> None:
        while not self._stop.is_set() and ray.is_initialized():
            with self._lock:
                try:
                    item = self.rows.get(timeout=0.5)
                except (Empty, queue.Empty):
                    continue
                except BaseException:  # noqa: BLE001 - Ray shut down under the wait (SystemExit): no more rows
                    return
                self._deliver(item)

    def _deliver(self, item: tuple[str, dict[str, Any]]) -> None:
        key, row = item
        sink = self._sinks.get(key)
        if sink is None:
            return
        try:
            sink(row)
        except Exception as e:  # noqa: BLE001 - an unreachable tracker must not end the job
            self.log(f"{key}: epoch {row.get('epoch')} not tracked ({type(e).__name__}: {e})")
