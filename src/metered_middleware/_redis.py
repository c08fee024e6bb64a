"""Building the Redis client from a URL: one place that knows single-node from cluster."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

__all__ = ["REDIS_FAILURES", "connect", "read_with_retry"]

# What a Redis call can fail with. AttributeError belongs here because redis-py's asyncio cluster client
# raises "'NoneType' object has no attribute 'writelines'" when a connection is torn down under concurrent
# use: a transport failure like any other, to be retried, never a 500.
REDIS_FAILURES = (RedisError, OSError, AttributeError)


def connect(url: str) -> aioredis.Redis:
    """An asyncio client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+cluster://`` URLs.

    Timeouts are short on purpose: the middleware must notice a dead Redis in about a second, not hang
    requests for the operating system's TCP timeout.
    """
    if url.startswith("redis+cluster://"):
        # RedisCluster speaks the same command API; callers type against the common client surface.
        return RedisCluster.from_url(  # type: ignore[return-value]
            "redis://" + url.removeprefix("redis+cluster://"),
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
        )
    return aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)


_T = TypeVar("_T")


async def read_with_retry(read: Callable[[], Awaitable[_T]], attempts: int = 3) -> _T:
    """Run an idempotent read, again when the cluster client trips over a connection torn down under it.

    redis-py's asyncio cluster client can hand out a pooled connection while a topology refresh is still
    disconnecting it (seen in CI as AttributeError on ``_writer``). A read is safe to repeat; anything else
    (Redis really down) fails at once.
    """
    for attempt in range(attempts):
        try:
            return await read()
        except AttributeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
