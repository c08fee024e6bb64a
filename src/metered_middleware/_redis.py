"""Building the Redis client from a URL: one place that knows single-node from cluster."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

__all__ = ["REDIS_FAILURES", "connect"]

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
