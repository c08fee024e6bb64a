"""A namespace's shard count is recorded at first use, and no app, flusher or command runs it under another.

Lowering ``METERED_SHARDS`` would leave the dropped shards' pending units to no flusher, and raising it would
count into shards the old flushers never read: usage kept and billed to nobody, without a word.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.types import Message

from metered_middleware import (
    BillingTarget,
    CountStore,
    DeliverySettings,
    Flusher,
    KeyRegistry,
    Layout,
    LayoutMismatchError,
    MeteringMiddleware,
    StorageError,
)
from metered_middleware._guard import LayoutGuard
from metered_middleware._redis import connect
from metered_middleware._redis_server import RedisServer, free_port
from metered_middleware._store import CountWrite
from tests.helpers import Lifespan, make_app, pending_totals

pytestmark = pytest.mark.anyio

NOW = int(time.time())
T = BillingTarget(customer="cus_g", subscription_item="si_g", period_start=NOW - 100, period_end=NOW + 100)


async def _record(redis: aioredis.Redis) -> bytes:
    raw = await redis.get("mm:layout")
    assert isinstance(raw, bytes)
    return raw


def _write(layout: Layout, writer: str, units: int) -> CountWrite:
    return CountWrite(layout.shard_of(T.target_id), writer, 1, [(T, units)])


async def _keys_and_values(redis: aioredis.Redis) -> dict[Any, Any]:
    """Every key with what it holds (a hash's fields, a string's value): to show that nothing changed."""
    found: dict[Any, Any] = {}
    for name in await redis.keys("*"):
        kind = await redis.type(name)
        found[name] = await (redis.hgetall(name) if kind == b"hash" else redis.dump(name))
    return found


async def test_the_first_writer_records_the_layout_and_another_shard_count_writes_nothing(
    redis_client: aioredis.Redis,
) -> None:
    """Counting records 4 shards; stores of 2 and of 8 are refused before writing a byte."""
    four = Layout("mm", 4)
    assert await CountStore(redis_client, four).apply([_write(four, "w1", 3)]) == [True]
    assert json.loads(await _record(redis_client)) == {"shards": 4, "buckets": 16}
    before = await _keys_and_values(redis_client)
    for shards in (2, 8):
        other = Layout("mm", shards)
        with pytest.raises(StorageError, match="Set METERED_SHARDS=4") as caught:
            await CountStore(redis_client, other).apply([_write(other, f"w{shards}", 5)])
        assert isinstance(caught.value.__cause__, LayoutMismatchError)
        assert f"METERED_SHARDS={shards} is not valid" in str(caught.value)
    assert await _keys_and_values(redis_client) == before
    assert await pending_totals(redis_client, four) == {T.target_id: 3}
    # Another namespace has a layout of its own.
    other_ns = Layout("other", 2)
    assert await CountStore(redis_client, other_ns).apply([_write(other_ns, "w1", 1)]) == [True]


async def test_two_processes_racing_on_an_empty_namespace_agree_on_one_layout(
    redis_client: aioredis.Redis,
) -> None:
    """SET NX arbitrates: of two first checks with different shard counts, exactly one passes."""
    guards = [LayoutGuard(redis_client, Layout("mm", n)) for n in (3, 5) for _ in range(4)]
    results = await asyncio.gather(*(g.check() for g in guards), return_exceptions=True)
    recorded = json.loads(await _record(redis_client))["shards"]
    for guard, result in zip(guards, results, strict=True):
        if guard.layout.shards == recorded:
            assert result is None
        else:
            assert isinstance(result, LayoutMismatchError)


async def test_a_record_from_another_bucket_count_or_unreadable_is_refused(
    redis_client: aioredis.Redis,
) -> None:
    """A version that split shards differently, or a record nobody can read, is never counted over."""
    guard = LayoutGuard(redis_client, Layout("mm", 4))
    await redis_client.set("mm:layout", json.dumps({"shards": 4, "buckets": 8}))
    with pytest.raises(LayoutMismatchError, match="one version of it in every app and flusher"):
        await guard.check()
    await redis_client.set("mm:layout", "not json")
    with pytest.raises(LayoutMismatchError, match="unreadable"):
        await guard.check()


async def test_readers_record_nothing(redis_client: aioredis.Redis) -> None:
    """``status`` on an empty namespace does not fix its shard count for the apps that come after."""
    await LayoutGuard(redis_client, Layout("mm", 7)).check(record=False)
    assert await redis_client.get("mm:layout") is None
    await LayoutGuard(redis_client, Layout("mm", 4)).check()
    with pytest.raises(LayoutMismatchError):
        await LayoutGuard(redis_client, Layout("mm", 7)).check(record=False)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_an_app_of_another_shard_count_keeps_its_counts_in_process_and_says_why(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Its requests are served (open mode), its units kept and reported, the recorded shards untouched."""
    key = (await KeyRegistry(redis_client).create(T)).key
    right = MeteringMiddleware(make_app(), redis=redis_client, environ={}, shards=4)
    wrong = MeteringMiddleware(make_app(), redis=redis_client, environ={}, shards=2)
    async with _client(right) as http:
        for _ in range(3):
            assert (await http.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
    await right.aclose()
    caplog.set_level(logging.ERROR, "metered_middleware.counter")
    async with _client(wrong) as http:
        for _ in range(5):
            assert (await http.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
    with pytest.raises(StorageError, match="Set METERED_SHARDS=4"):
        await wrong.flush()
    assert wrong.counter.stats.buffered_units == 5
    assert not wrong.counter.healthy
    assert "Set METERED_SHARDS=4" in caplog.text
    assert key not in caplog.text
    await wrong.counter.aclose(timeout=0)
    assert await pending_totals(redis_client, Layout("mm", 4)) == {T.target_id: 3}


async def test_a_closed_mode_app_of_another_shard_count_refuses_requests_with_a_clear_code(
    redis_client: aioredis.Redis,
) -> None:
    """Closed mode serves nothing it cannot count: after its first refused write, 503 metering_unavailable."""
    await LayoutGuard(redis_client, Layout("mm", 4)).check()
    key = (await KeyRegistry(redis_client).create(T)).key
    wrong = MeteringMiddleware(make_app(), redis=redis_client, environ={}, shards=2, fail_mode="closed")
    async with _client(wrong) as http:
        assert (await http.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
        with pytest.raises(StorageError):
            await wrong.flush()
        refused = await http.get("/v1/hello", headers={"X-API-Key": key})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "metering_unavailable"
    await wrong.counter.aclose(timeout=0)


def _app_with_lifespan(started: list[bool]) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(True)
        yield

    return Starlette(lifespan=lifespan)


async def test_an_app_of_another_shard_count_fails_its_startup(redis_client: aioredis.Redis) -> None:
    """The server is told ``lifespan.startup.failed`` with the reason; the app's own startup never runs."""
    await LayoutGuard(redis_client, Layout("mm", 4)).check()
    started: list[bool] = []
    metered = MeteringMiddleware(_app_with_lifespan(started), redis=redis_client, environ={}, shards=2)
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    await to_app.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await asyncio.wait_for(metered(scope, to_app.get, from_app.put), 5)
    message = from_app.get_nowait()
    assert message["type"] == "lifespan.startup.failed"
    assert "Set METERED_SHARDS=4" in message["message"]
    assert started == []

    same = MeteringMiddleware(_app_with_lifespan(started), redis=redis_client, environ={}, shards=4)
    async with Lifespan(same):
        assert started == [True]


async def test_an_app_starts_while_redis_is_down(tmp_path: Path) -> None:
    """An outage at startup is no reason to stay down: the first count write checks the layout instead."""
    dead = connect(f"redis://127.0.0.1:{free_port()}/0")
    started: list[bool] = []
    metered = MeteringMiddleware(_app_with_lifespan(started), redis=dead, environ={}, shards=2)
    async with Lifespan(metered):
        assert started == [True]
    await dead.aclose()


def _delivery(url: str, shards: int) -> DeliverySettings:
    return DeliverySettings(stripe_api_key="sk_test_x", redis_url=url, shards=shards, rate_limit=0)


async def test_a_flusher_of_another_shard_count_refuses_to_start(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """In code it raises; ``flush`` (and ``dead-letter``, ``status``, ``usage``) exit 2 with the reason."""
    four = Layout("mm", 4)
    await CountStore(redis_client, four).apply([_write(four, "w1", 3)])
    with pytest.raises(LayoutMismatchError, match="Set METERED_SHARDS=4"):
        async with Flusher(_delivery(redis_url, 2)):
            pass
    env = {
        **os.environ,
        "METERED_REDIS_URL": redis_url,
        "METERED_SHARDS": "2",
        "STRIPE_API_KEY": "sk_test_x",
        "METERED_STRIPE_API_BASE": "http://127.0.0.1:1",
    }
    commands = [
        ["metered_middleware._cli_flush", "flush", "--once"],
        ["metered_middleware._cli_flush", "dead-letter", "list"],
        ["metered_middleware.cli", "status"],
        ["metered_middleware.cli", "usage", "--customer", T.customer],
    ]
    for command in commands:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, err
        assert b"error: METERED_SHARDS=2 is not valid" in err
        assert b"Set METERED_SHARDS=4" in err
        assert b"Traceback" not in err
    assert await pending_totals(redis_client, four) == {T.target_id: 3}


async def test_a_flusher_started_while_redis_was_down_checks_before_its_first_pass(tmp_path: Path) -> None:
    """It skips passes while Redis is down, and refuses the first pass Redis answers under another layout."""
    with RedisServer(directory=str(tmp_path)) as server:
        server.stop()
        async with Flusher(_delivery(server.url, 2)) as flusher:
            report = await flusher.flush_once()
            assert report.skipped_shards == [0, 1]
            server.start()
            client = connect(server.url)
            try:
                await LayoutGuard(client, Layout("mm", 4)).check()
            finally:
                await client.aclose()
            with pytest.raises(LayoutMismatchError, match="Set METERED_SHARDS=4"):
                await flusher.flush_once()
