"""Counting under real concurrency and through Redis failures: totals stay exact."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Literal

import httpx
import pytest
import redis.asyncio as aioredis

from metered_middleware import BillingTarget, KeyRegistry, MeteringMiddleware
from metered_middleware._layout import Layout
from metered_middleware._redis_server import RedisServer
from tests.helpers import make_app, pending_totals

pytestmark = pytest.mark.anyio

NOW = int(time.time())


def target(i: int) -> BillingTarget:
    return BillingTarget(
        customer=f"cus_{i}",
        subscription_item=f"si_{i}",
        meter_event_name="calls",
        period_start=NOW - 60,
        period_end=NOW + 3600,
    )


async def test_two_instances_fifty_clients_exact_totals(redis_client: aioredis.Redis, redis_url: str) -> None:
    """2 app processes x 50 concurrent clients x 200 requests over 20 keys: every target's count is exact."""
    registry = KeyRegistry(redis_client)
    keys = [(await registry.create(target(i))).key for i in range(20)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.load_instance",
            redis_url,
            "50",
            "200",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.gather(*(p.communicate("\n".join(keys).encode()) for p in procs))
    assert [p.returncode for p in procs] == [0, 0]
    assert [int(out) for out, _ in outputs] == [10_000, 10_000]
    totals = await pending_totals(redis_client, Layout("mm", 4))
    # Each client n sends request i with key (n + i) % 20: 50 x 200 / 20 = 500 per key per instance.
    assert totals == {target(i).target_id: 1_000 for i in range(20)}


@pytest.fixture
async def durable_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer(appendonly=True, appendfsync="always").start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
async def test_redis_restart_mid_traffic(
    durable_redis: RedisServer, fail_mode: Literal["open", "closed"]
) -> None:
    """Redis stopped and restarted under load: every 200 served is counted exactly once, in both modes.

    Open mode serves throughout and writes the buffered counts when Redis returns; closed mode answers
    503 metering_unavailable while Redis is down, and those refusals are not counted.
    """
    client = aioredis.Redis.from_url(durable_redis.url, socket_connect_timeout=0.3, socket_timeout=1)
    registry = KeyRegistry(client)
    keys = [(await registry.create(target(i))).key for i in range(5)]
    metered = MeteringMiddleware(
        make_app(), redis=client, environ={}, coalesce_window=0.02, fail_mode=fail_mode
    )
    served = 0
    statuses: dict[int, int] = {}
    stop = asyncio.Event()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as http:

        async def load(n: int) -> None:
            nonlocal served
            i = 0
            while not stop.is_set():
                r = await http.get("/v1/hello", headers={"X-API-Key": keys[(n + i) % len(keys)]})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                served += r.status_code == 200
                i += 1
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(load(n)) for n in range(10)]
        await asyncio.sleep(0.4)
        await asyncio.to_thread(durable_redis.stop)
        await asyncio.sleep(0.8)
        await asyncio.to_thread(durable_redis.start)
        await asyncio.sleep(0.6)
        stop.set()
        await asyncio.gather(*tasks)
    await metered.aclose()
    totals = await pending_totals(client, metered.layout)
    assert sum(totals.values()) == served
    assert set(statuses) <= {200, 503}
    if fail_mode == "closed":
        assert statuses.get(503, 0) > 0, statuses
    else:
        assert 503 not in statuses, statuses
    await client.aclose()


@pytest.mark.parametrize(("window", "wait"), [(0.05, 0.5), (0.0, 0.0)])
async def test_kill_9_loses_at_most_the_open_window(
    redis_client: aioredis.Redis, redis_url: str, window: float, wait: float
) -> None:
    """SIGKILL of an app process loses no count older than one coalescing window; with window 0, none at all.

    The process serves its requests, reports how many got a 200, and is killed without any shutdown: once a
    window has passed (or at once, with window 0) Redis holds every one of them.
    """
    registry = KeyRegistry(redis_client)
    keys = [(await registry.create(target(i))).key for i in range(5)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.load_instance",
        redis_url,
        "10",
        "30",
        str(window),
        "hold",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write("\n".join(keys).encode())
    proc.stdin.close()
    served = int(await asyncio.wait_for(proc.stdout.readline(), 60))
    await asyncio.sleep(wait)
    proc.kill()
    assert await proc.wait() == -9
    assert served == 300
    totals = await pending_totals(redis_client, Layout("mm", 4))
    assert sum(totals.values()) == served
