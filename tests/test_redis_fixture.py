"""The suite runs against a real Redis server."""

import pytest
import redis.asyncio as aioredis

pytestmark = pytest.mark.anyio


async def test_redis_is_real_and_runs_lua(redis_client: aioredis.Redis) -> None:
    """A server answers INFO and runs a Lua script: no in-memory fake could stand in for either."""
    info = await redis_client.info("server")
    assert "redis_version" in info
    assert await redis_client.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "k", 5) == 5
