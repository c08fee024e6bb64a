"""Shared fixtures: one real Redis server for the session, flushed before every test that uses it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from metered_middleware._redis_server import RedisServer


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run async tests on asyncio, the loop uvicorn and the stripe SDK's httpx client use."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """A redis-server for the whole session, or None when REDIS_URL points at one the caller runs."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> str:
    """The URL of the session's Redis."""
    if redis_server is None:
        return os.environ["REDIS_URL"]
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on a freshly flushed database."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
