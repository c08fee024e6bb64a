"""Building the Redis client from a URL: one place that knows single-node from cluster."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

__all__ = ["REDIS_FAILURES", "connect", "hash_sum", "read_with_retry"]

# What a Redis call can fail with. AttributeError belongs here because redis-py's asyncio cluster client
# raises "'NoneType' object has no attribute 'writelines'" when a connection is torn down under concurrent
# use: a transport failure like any other, to be retried, never a 500.
REDIS_FAILURES = (RedisError, OSError, AttributeError)


# Connections one client opens at most, and how long a caller waits for one before failing.
MAX_CONNECTIONS = 32
POOL_WAIT = 1.0


class _ClusterClient(RedisCluster):
    """redis-py's asyncio cluster client, closed completely even after a connection error.

    redis-py 8.1's ``aclose`` returns at once while a connection error has flagged the client for
    re-initialization, so a client closed after an outage (a master died, the shutdown gave up on it) left
    every pooled connection open: sockets leaked until garbage collection, and ResourceWarnings there.
    """

    async def aclose(self) -> None:
        await super().aclose()
        # Closing twice is harmless: a disconnected connection's disconnect returns at once.
        await self.nodes_manager.aclose()
        await self.nodes_manager.aclose("startup_nodes")


def connect(url: str) -> aioredis.Redis:
    """An asyncio client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+cluster://`` URLs.

    Timeouts are short on purpose: the middleware must notice a dead Redis in about a second, not hang
    requests for the operating system's TCP timeout.
    """
    if url.startswith("redis+cluster://"):
        # RedisCluster speaks the same command API; callers type against the common client surface.
        return _ClusterClient.from_url(  # type: ignore[return-value]
            "redis://" + url.removeprefix("redis+cluster://"),
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
        )
    # A bounded pool that makes callers wait for a free connection: a cold cache at high concurrency (a
    # thousand keys missing at once) queues behind MAX_CONNECTIONS instead of opening one connection per
    # miss, whose connect timeouts would refuse keys while Redis is healthy. A Redis that is really down
    # still fails in about a second: refused connects return at once, hung ones time out after 1 s.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
    )
    return aioredis.Redis.from_pool(pool)


_T = TypeVar("_T")


async def read_with_retry(read: Callable[[], Awaitable[_T]], attempts: int = 3) -> _T:
    """Run an idempotent read, again when the connection it went out on turns out to be gone.

    Two cases, both safe to repeat for a read: a pooled connection Redis has closed (a restart, an idle
    ``timeout``), which redis-py 8 reports as ConnectionError instead of reconnecting; and the asyncio cluster
    client handing out a connection a topology refresh is still disconnecting (seen in CI as AttributeError
    on ``_writer``). A Redis that is really down fails every attempt at once (refused) or times out.
    """
    for attempt in range(attempts):
        try:
            return await read()
        except (AttributeError, RedisConnectionError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


async def hash_sum(redis: aioredis.Redis, names: Sequence[str], field: str) -> int:
    """One field's values in several hashes of one slot, added up, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hget(name, field)
        return sum(int(value or 0) for value in await pipe.execute())
