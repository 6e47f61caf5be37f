"""One retry of a call to another deployment whose replica died under it.

Every call between the deployments is a prediction: pure and idempotent. When the replica that
took it dies (crash, node loss, kill), Serve routes the same call once more to a live replica,
so a replica restart costs latency, not an answer. A second failure is real and propagates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError

T = TypeVar("T")


async def once_more_if_dead(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, and once more if its replica died under it."""
    try:
        return await call()
    except RayActorError:
        return await call()
