"""The drain flag: one tiny actor that every ingress replica, on every node, watches.

A file would be seen only on the machine that made it; an actor is reached from any node. The
flag is :class:`DrainFlag` (``num_cpus=0``), named by the app's ``drain`` argument in the
``supersub`` namespace. ``python -m serve`` creates it before deploying and owns it, so it ends
with the launcher; each ingress replica holds a :class:`DrainWatch`, a thread that long-polls the
flag — the answer comes as soon as the state changes, and nothing is polled while nothing
happens — and, while draining, reports the replica's requests in flight every 0.1 s, so that
the launcher knows when every replica is idle (:meth:`DrainFlag.busy`).

A watcher that finds the flag gone after having seen it drains at once: its owner, the launcher,
has stopped, and nothing will resume the app. A flag that was never there means no drain (an app
run by ``serve run``/``serve deploy`` without it).

For apps deployed with ``serve deploy``, ``python -m serve.drain NAME [--grace-s S]`` drains and
``python -m serve.drain NAME --resume`` resumes; the flag it creates is detached (it outlives the
command) and is left in place, idle, after ``--resume``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable

import ray

NAMESPACE = "supersub"
STALE_S = 2.0  # a replica silent this long while draining is gone (killed, its node lost)
REPORT_S = 0.1  # while draining, each replica reports its requests in flight this often


@ray.remote(num_cpus=0, max_restarts=0)
class DrainFlag:
    """Draining or not, since when, and what each ingress replica still has in flight."""

    def __init__(self) -> None:
        self.refuse_at: float | None = None  # on this actor's clock (monotonic)
        self.changed = asyncio.Event()
        self.replicas: dict[str, tuple[int, float, bool]] = {}  # id → in flight, last seen, seen the drain
        self.waiting: set[str] = set()  # replicas whose watch call is open: alive, however long ago they called

    def _state(self) -> float | None:
        return None if self.refuse_at is None else max(0.0, self.refuse_at - time.monotonic())

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def start(self, grace_s: float = 0.0) -> None:
        """Drain: /healthz answers 503 at once, /predict after ``grace_s`` seconds."""
        self.refuse_at = time.monotonic() + max(0.0, grace_s)
        self.replicas = {k: (n, seen, False) for k, (n, seen, _) in self.replicas.items()}
        self._notify()

    async def resume(self) -> None:
        self.refuse_at = None
        self._notify()

    async def watch(self, replica: str, draining: bool, in_flight: int, wait_s: float) -> float | None:
        """The replica's report; returns the state — None (serving) or the seconds left until
        /predict refuses — once it differs from what the replica knows, or after ``wait_s``."""
        self.replicas[replica] = (in_flight, time.monotonic(), draining and self.refuse_at is not None)
        if (self.refuse_at is not None) == draining:
            changed = self.changed
            self.waiting.add(replica)
            try:
                await asyncio.wait_for(changed.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
            finally:
                self.waiting.discard(replica)
        return self._state()

    async def busy(self) -> tuple[int, int]:
        """While draining: (replicas not known to be idle, their requests in flight). A replica
        counts as idle when its last report, made knowing of the drain, was 0; one silent for
        STALE_S is gone and not counted."""
        now, replicas, total = time.monotonic(), 0, 0
        for replica, (in_flight, seen, knows) in self.replicas.items():
            if now - seen > STALE_S and replica not in self.waiting:
                continue
            if not knows or in_flight > 0:
                replicas, total = replicas + 1, total + in_flight
        return replicas, total


def create(name: str, detached: bool = False):
    """The flag ``name``: the existing one, else a new one (owned by this process unless
    ``detached``)."""
    return DrainFlag.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                             lifetime="detached" if detached else None).remote()


class DrainWatch:
    """An ingress replica's view of the flag ``name``: :attr:`draining` and :meth:`refusing`
    read without a call; ``in_flight`` says what the replica has in flight."""

    def __init__(self, name: str, in_flight: Callable[[], int]) -> None:
        self.name, self.in_flight = name, in_flight
        self.id = uuid.uuid4().hex
        self.draining, self._refuse_at = False, 0.0
        threading.Thread(target=self._run, name="drain-watch", daemon=True).start()

    def refusing(self) -> bool:
        """Draining and past the grace: new /predict requests are refused."""
        return self.draining and time.monotonic() >= self._refuse_at

    def _set(self, left: float | None) -> None:
        if left is None:
            self.draining = False
        else:
            self._refuse_at = time.monotonic() + left
            self.draining = True

    def _run(self) -> None:
        from ray.exceptions import ActorDiedError

        flag, seen = None, False
        while True:
            try:
                if flag is None:
                    flag = ray.get_actor(self.name, namespace=NAMESPACE)
                    seen = True
                wait = REPORT_S if self.draining else 30.0
                self._set(ray.get(flag.watch.remote(self.id, self.draining, self.in_flight(), wait), timeout=wait + 30))
            except ValueError:  # no such actor (yet, or any more)
                if seen:
                    self._set(0.0)
                time.sleep(1.0)
            except ActorDiedError:  # it died with its owner: nobody will resume this app
                flag = None
                self._set(0.0)
                time.sleep(1.0)
            except Exception:  # noqa: BLE001 - unreachable for now (a timeout, its node, the network): keep what is known
                time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.drain", description="Drain (or resume) every ingress replica "
                                "of the apps whose `drain` argument is NAME, on every node of the cluster (RAY_ADDRESS).")
    p.add_argument("name")
    p.add_argument("--grace-s", type=float, default=1.0, help="/predict keeps answering this long (/healthz: 503 at once)")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", namespace=NAMESPACE, log_to_driver=False)
    flag = create(a.name, detached=True)
    ray.get(flag.resume.remote() if a.resume else flag.start.remote(a.grace_s), timeout=60)
    print(("resumed " if a.resume else "draining ") + a.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
