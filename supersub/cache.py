"""One bounded, thread-safe LRU cache, used wherever the core keeps things for reuse: row groups
of Parquet shards, decoded splits, decoded specialist deltas."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """Keeps values until their summed ``size(value)`` passes ``max_bytes`` (the least recently
    used go first) or their number passes ``max_items``, but always the ``min_items`` newest
    (a row-group cache keeps the group it reads from even when one group is over the bound).
    A value that cannot be kept is still returned. ``get_or_make`` makes a missing value
    outside the lock, so a slow maker does not block readers of other keys."""

    def __init__(self, max_bytes: float = float("inf"), max_items: float = float("inf"),
                 size: Callable[[V], int] = lambda v: 0, min_items: int = 0) -> None:
        self.max_bytes, self.max_items, self.size, self.min_items = max_bytes, max_items, size, min_items
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: V) -> V:
        n = self.size(value)
        if self.min_items < 1 and (n > self.max_bytes or self.max_items < 1):
            return value
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, n)
            self._bytes += n
            while len(self._items) > self.min_items and (self._bytes > self.max_bytes or len(self._items) > self.max_items):
                self._bytes -= self._items.popitem(last=False)[1][1]
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        hit = self.get(key)
        return hit if hit is not None else self.put(key, make())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
