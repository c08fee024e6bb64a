"""Coalesced counting writes to Redis once per window, idempotently, with bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from metered_middleware import BillingTarget, Counter, CountStore, _counter, _fastpath
from metered_middleware._errors import StorageError
from metered_middleware._layout import Layout
from metered_middleware._redis import connect
from metered_middleware._redis_server import RedisServer
from metered_middleware._store import CountWrite
from tests.helpers import pending_totals, use_pure_python

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["python", *(["native"] if _fastpath.NATIVE else [])], autouse=True)
def tally(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the compiled tally (where it is built) and with its Python twin."""
    if request.param == "python":
        use_pure_python(monkeypatch)
    return str(request.param)


NOW = int(time.time())
A = BillingTarget(customer="cus_a", subscription_item="si_a", period_start=NOW - 100, period_end=NOW + 100)
B = BillingTarget(customer="cus_b", meter_event_name="calls")


async def test_a_retried_write_is_applied_once(redis_client: aioredis.Redis) -> None:
    """Sending the same (writer, seq) twice, as a retry after a lost reply does, counts once."""
    layout = Layout("mm", 4)
    store = CountStore(redis_client, layout)
    write = CountWrite(layout.shard_of(A.target_id), "w1", 1, [(A, 3)])
    assert await store.apply([write]) == [True]
    assert await store.apply([write]) == [True]
    assert await pending_totals(redis_client, layout) == {A.target_id: 3}
    assert await store.period_usage(A) == 3
    later = CountWrite(write.shard, "w1", 2, [(A, 4)])
    await store.apply([later])
    assert await pending_totals(redis_client, layout) == {A.target_id: 7}
    ttl = await redis_client.ttl(layout.target_usage_keys(A.target_id, NOW - 100)[1])
    assert 100 < ttl <= 100 + store.usage_retention  # kept past the period for reconciliation, not forever


async def test_writes_go_through_after_redis_drops_the_pooled_connections(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """Redis closing the counter's idle connections (a restart, an idle timeout) costs no failed window:
    the next write goes out on a fresh connection, once, and the counter stays healthy."""
    layout = Layout("mm", 4)
    own = aioredis.Redis.from_url(redis_url)
    counter = Counter(CountStore(own, layout), layout, window=10)
    counter.add(A, 1)
    await counter.flush()
    assert await redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
    counter.add(A, 2)
    counter.add(B, 3)
    await counter.flush()
    assert counter.healthy
    assert counter.stats.write_errors == 0
    assert await pending_totals(redis_client, layout) == {A.target_id: 3, B.target_id: 3}
    await counter.aclose()
    await own.aclose()


async def test_writes_survive_redis_forgetting_the_count_script(redis_client: aioredis.Redis) -> None:
    """After SCRIPT FLUSH (as after a Redis restart) the next writes reload the script and land once each."""
    layout = Layout("mm", 4)
    store = CountStore(redis_client, layout)
    first = CountWrite(layout.shard_of(A.target_id), "w1", 1, [(A, 3)])
    assert await store.apply([first]) == [True]
    await redis_client.script_flush()
    writes = [
        CountWrite(layout.shard_of(A.target_id), "w1", 2, [(A, 4)]),
        CountWrite(layout.shard_of(B.target_id), "w1", 3, [(B, 5)]),
    ]
    assert await store.apply(writes) == [True, True]
    assert await store.apply(writes) == [True, True]  # a retry after a lost reply still counts once
    assert await pending_totals(redis_client, layout) == {A.target_id: 7, B.target_id: 5}


async def test_many_adds_one_write(redis_client: aioredis.Redis) -> None:
    """A thousand adds in a window become one pipeline with one line per target."""
    layout = Layout("mm", 4)
    counter = Counter(CountStore(redis_client, layout), layout, window=10)
    for _ in range(1000):
        counter.add(A, 1)
        counter.add(B, 2)
    await counter.flush()
    assert await pending_totals(redis_client, layout) == {A.target_id: 1000, B.target_id: 2000}
    assert counter.stats.writes <= 2  # at most one per shard touched
    assert counter.stats.buffered_units == 0
    await counter.aclose()


def big_window(redis_client: aioredis.Redis) -> tuple[Counter, list[BillingTarget]]:
    """A counter (4 shards, a window that never ends by itself) holding 2 units for each of 1,000 targets."""
    layout = Layout("mm", 4)
    counter = Counter(CountStore(redis_client, layout), layout, window=10)
    targets = [BillingTarget(customer=f"cus_{n}", meter_event_name="calls") for n in range(1000)]
    for target in targets:
        counter.add(target, 2)
    return counter, targets


async def assert_counted_once_after_more(
    redis_client: aioredis.Redis, counter: Counter, targets: list[BillingTarget]
) -> None:
    """Count 5 more for the first target and flush: Redis must hold the big window once, plus those 5."""
    counter.add(targets[0], 5)
    await counter.flush()
    expected = {t.target_id: 2 for t in targets}
    expected[targets[0].target_id] = 7
    assert await pending_totals(redis_client, counter.layout) == expected
    assert counter.stats.buffered_units == 0
    await counter.aclose()


async def test_a_flush_cancelled_while_taking_a_window_loses_nothing(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grouping a big window in Python yields to the event loop; a cancellation there (``aclose`` stopping
    the writer) keeps the window, and the next flush writes every unit once, with what was counted
    meanwhile. (The compiled grouping does not yield: the next test cancels its write in flight.)"""
    monkeypatch.setattr(_counter, "NATIVE", False)
    counter, targets = big_window(redis_client)
    task = asyncio.get_running_loop().create_task(counter.flush())
    for _ in range(3):
        await asyncio.sleep(0)
    assert counter._taking is not None, "the cancellation must land while the window is being grouped"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_counted_once_after_more(redis_client, counter, targets)


async def test_a_flush_cancelled_while_its_write_is_in_flight_counts_once(
    redis_client: aioredis.Redis,
) -> None:
    """Cancelled while Redis has (or has not yet) applied the window's writes: unacknowledged writes stay in
    the outbox and are resent with the same (writer, seq), so every unit lands exactly once."""
    counter, targets = big_window(redis_client)
    task = asyncio.get_running_loop().create_task(counter.flush())
    for _ in range(100):  # a few loop turns: the window is taken and grouped, the pipeline is sent
        if counter._outbox is not None:
            break
        await asyncio.sleep(0)
    assert counter._outbox is not None, "the cancellation must land while the writes are in flight"
    task.cancel()
    # redis-py may finish the pipeline it is reading and swallow the cancellation: either way, once.
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await assert_counted_once_after_more(redis_client, counter, targets)


async def test_targets_metadata_is_kept_for_the_flusher(redis_client: aioredis.Redis) -> None:
    """The period bounds a target was counted under are stored beside its pending count."""
    layout = Layout("mm", 2)
    counter = Counter(CountStore(redis_client, layout), layout, window=10)
    counter.add(A, 1)
    await counter.aclose()
    raw = await redis_client.hget(layout.targets(layout.shard_of(A.target_id)), A.target_id)
    assert raw is not None
    assert f'"period_start":{NOW - 100}'.encode() in raw
    assert f'"period_end":{NOW + 100}'.encode() in raw


async def test_overflow_is_counted_and_logged_never_silent(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the buffer's target limit, units for new targets are counted as overflow and logged."""
    layout = Layout("mm", 1)
    counter = Counter(CountStore(redis_client, layout), layout, window=10, max_targets=1)
    counter.add(A, 1)
    counter.add(A, 1)  # an existing target still fits
    counter.add(B, 5)
    assert counter.stats.overflow_units == 5
    assert "count buffer full" in caplog.text
    await counter.aclose()
    assert await pending_totals(redis_client, layout) == {A.target_id: 2}


async def test_counts_survive_redis_refusing_until_it_returns(redis_url: str) -> None:
    """While Redis is unreachable counts stay buffered and the counter reports unhealthy."""
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    layout = Layout("mm", 1)
    counter = Counter(CountStore(dead, layout), layout, window=10)
    counter.add(A, 4)
    with pytest.raises(Exception, match="count write failed"):
        await counter.flush()
    assert not counter.healthy
    assert counter.stats.buffered_units == 4
    live = aioredis.Redis.from_url(redis_url)
    await live.flushdb()
    counter.store = CountStore(live, layout)
    await counter.flush()
    assert counter.healthy
    assert await pending_totals(live, layout) == {A.target_id: 4}
    await counter.aclose()
    await dead.aclose()
    await live.aclose()


async def test_a_write_stalled_by_a_hung_redis_times_out_and_lands_once_after(tmp_path: Path) -> None:
    """Redis stops answering mid-write (SIGSTOP: a hung host, a long fork): the write fails after the
    client's timeout instead of hanging the counter, the units stay buffered, and when Redis resumes, runs
    the stalled write and then the retry of the same (writer, seq), they count once."""
    layout = Layout("mm", 1)
    with RedisServer(directory=str(tmp_path)) as server:
        client = connect(server.url)
        counter = Counter(CountStore(client, layout), layout, window=10)
        try:
            pid = int((await client.info("server"))["process_id"])
            counter.add(A, 5)
            await counter.flush()
            counter.add(A, 2)
            os.kill(pid, signal.SIGSTOP)
            try:
                with anyio.fail_after(30), pytest.raises(StorageError):
                    await counter.flush()
                assert not counter.healthy
                assert counter.stats.buffered_units == 2
            finally:
                os.kill(pid, signal.SIGCONT)
            await counter.flush()
            assert counter.healthy
            assert counter.stats.buffered_units == 0
            assert await pending_totals(client, layout) == {A.target_id: 7}
            assert await CountStore(client, layout).period_usage(A) == 7
        finally:
            await counter.aclose()
            await client.aclose()


async def test_one_write_carries_lines_of_several_periods_and_none(redis_client: aioredis.Redis) -> None:
    """Lines framed per usage hash land in pending and in their own period's usage; metadata once."""
    layout = Layout("mm", 1)
    store = CountStore(redis_client, layout)
    later = BillingTarget(customer="cus_c", period_start=NOW + 100, period_end=NOW + 200)
    write = CountWrite(0, "w1", 1, [(A, 3), (B, 2), (later, 5)])
    assert await store.apply([write]) == [True]
    assert await pending_totals(redis_client, layout) == {A.target_id: 3, B.target_id: 2, later.target_id: 5}
    assert await store.period_usage(A) == 3
    assert await store.period_usage(later) == 5
    assert await redis_client.hlen(layout.targets(0)) == 3
    again = CountWrite(0, "w1", 2, [(A, 1)])
    assert await store.apply([again]) == [True]
    # writer, seq, bucket count, one period and its expiry, two line groups; unchanged metadata is not resent
    assert len(store._keys_and_args(again)[1]) == 7
    assert await store.period_usage(A) == 4


def test_control_characters_are_refused_in_target_fields() -> None:
    """Count writes frame target ids with tabs and newlines, so no field may carry one."""
    for bad in ("cus_a\n", "cus\ta", "cus_\x00"):
        with pytest.raises(ValueError, match="control characters"):
            BillingTarget(customer=bad)


async def test_metadata_goes_out_once_then_again_after_the_resend_interval(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher's per-target metadata is sent once, not every window; sent again after META_RESEND
    (should Redis have lost it); and sent at once when it changes (a new period)."""
    from metered_middleware import _store

    monkeypatch.setattr(_store, "META_RESEND", 0.3)
    layout = Layout("t", 1)
    store = CountStore(redis_client, layout)
    seq = iter(range(1, 100))

    async def write(target: BillingTarget) -> dict[str, Any] | None:
        assert await store.apply([CountWrite(0, "w", next(seq), [(target, 1)])]) == [True]
        raw = await redis_client.hget(layout.targets(0), target.target_id)
        return json.loads(raw) if raw else None

    assert (await write(A) or {}).get("period_start") == A.period_start
    await redis_client.hdel(layout.targets(0), A.target_id)  # as if Redis had lost it
    assert await write(A) is None  # the same object, sent a moment ago
    assert await write(dataclasses.replace(A)) is None  # an equal one (the key cache refreshed)
    await asyncio.sleep(0.35)
    assert (await write(A) or {}).get("period_start") == A.period_start  # sent again
    later = dataclasses.replace(A, period_start=NOW + 100, period_end=NOW + 200)
    assert (await write(later) or {}).get("period_start") == NOW + 100  # changed: sent at once
    assert await store.period_usage(A) == 4
    assert await store.period_usage(later) == 1


async def test_a_window_is_packed_byte_for_byte_as_its_commands(redis_client: aioredis.Redis) -> None:
    """The pipeline's packing, with key names packed once per list, sends exactly the EVALSHAs it means."""
    from metered_middleware._store import pack_commands

    layout = Layout("t", 2)
    store = CountStore(redis_client, layout)
    later = BillingTarget(customer="cus_b", period_start=NOW + 100, period_end=NOW + 200)
    shard_a, shard_later = layout.shard_of(A.target_id), layout.shard_of(later.target_id)
    writes = [
        CountWrite(shard_a, "w1", 1, [(A, 3)]),
        CountWrite(shard_later, "w2", 1, [(later, 2)]),
        CountWrite(shard_a, "w3", 1, [(A, 1)]),
    ]
    for _ in range(2):  # the second time from the cache of packed names
        expected = []
        for write in writes:
            keys, args = store._keys_and_args(write)
            expected.append(("EVALSHA", store._count.sha, len(keys), *keys, *args))
        assert store._pack(writes) == pack_commands(expected)
    assert await store.apply(writes) == [True, True, True]
    assert await store.period_usage(A) == 4
    assert await store.period_usage(later) == 2


def test_count_writes_are_packed_as_redis_py_packs_them() -> None:
    """The store's own packer writes the very bytes redis-py's connection would for the same commands."""
    from redis.asyncio.connection import Connection

    from metered_middleware._store import pack_commands

    commands = [
        ("EVALSHA", "a" * 40, 2, "mm:{mm-0}:pending", "mm:{mm-0}:usage:1700000000", "w1", 7, 1, 1_703_000),
        ("EVALSHA", "b" * 40, 1, "ключ", b"cus_a||\t3\n" * 5000, b"", -3, "{}"),  # unicode, a big blob
    ]
    assert pack_commands(commands) == b"".join(Connection().pack_commands(commands))
