"""Building the Redis client from a URL: one place that knows single-node from cluster."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

__all__ = ["connect"]


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
