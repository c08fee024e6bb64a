"""A real 3-master Redis Cluster for the cluster scenarios, started once per module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from metered_middleware._redis import connect
from metered_middleware.testing.cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Three masters, no replicas."""
    with LocalCluster(3) as running:
        yield running


@pytest.fixture
async def cluster_client(cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    """A cluster client (through ``connect``, as the library builds it) on emptied masters."""
    client = connect(cluster.url)
    for port in [n.port for n in cluster.nodes() if n.role == "master"]:
        plain = aioredis.Redis(host="127.0.0.1", port=port)
        await plain.flushall()
        await plain.aclose()
    try:
        yield client
    finally:
        await client.aclose()
