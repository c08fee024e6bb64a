"""The flusher end to end against real Redis and the Stripe emulator, for every sink."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from metered_middleware._delivery_config import HTTP_CLIENTS, DeliverySettings, HTTPClientName
from metered_middleware._errors import StorageError
from metered_middleware._flusher import Flusher
from metered_middleware._layout import Layout
from metered_middleware._lifespan import flusher_lifespan
from metered_middleware._redis_server import RedisServer
from metered_middleware._sinks import Outcome, SendLine
from metered_middleware._target import BillingTarget
from tests.helpers import count_as_middleware

from .conftest import World

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_counted_usage_reaches_stripe_exactly(world: World, http_client: HTTPClientName) -> None:
    """Every counted unit is recorded by Stripe once, and nothing stays pending (through either transport)."""
    world.http_client = http_client
    targets = [world.subscribe(f"c{i}") for i in range(5)]
    await world.count([(t, i + 1) for i, t in enumerate(targets)])
    await world.count([(targets[0], 10)])
    async with Flusher(world.settings()) as flusher:
        report = await flusher.flush_once()
    assert report.complete
    assert report.delivered == 5
    await world.assert_exact()


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_a_flusher_on_uvloop_delivers_exactly(world: World, http_client: HTTPClientName) -> None:
    """An in-app flusher runs on the app server's loop, uvloop under uvicorn: delivery through either
    transport works there too (uvloop's transports are not asyncio's classes)."""
    world.http_client = http_client
    targets = [world.subscribe(f"u{i}") for i in range(3)]
    await world.count([(t, i + 2) for i, t in enumerate(targets)])
    async with Flusher(world.settings()) as flusher:
        report = await flusher.flush_once()
    assert report.complete, report
    assert report.delivered == 3
    await world.assert_exact()


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "commit_then_500", "commit_then_drop"])
async def test_stripe_storms_delay_delivery_but_totals_stay_exact(
    world: World, fault: str, http_client: HTTPClientName
) -> None:
    """A stretch of 429s, 5xx, timeouts or lost responses (with added latency) only delays delivery,
    through either transport."""
    world.http_client = http_client
    targets = [world.subscribe(f"s{i}") for i in range(4)]
    await world.count([(t, 3 * i + 1) for i, t in enumerate(targets)])
    world.emu.inject("*", fault, times=6, delay=0.3 if fault == "timeout" else None)
    world.emu.set_latency("*", 0.01)
    async with Flusher(world.settings(request_timeout=0.2)) as flusher:
        report = await flusher.flush_once()
    assert report.complete, report
    await world.assert_exact()
    assert any(r.fault for r in world.emu.requests()), "the storm never reached the flusher"


async def test_retries_stop_after_the_budget_and_leave_lines_for_later(world: World) -> None:
    """When Stripe stays down, the pass gives up with lines left in Redis; the next pass delivers them."""
    target = world.subscribe("down")
    await world.count([(target, 9)])
    world.emu.inject("*", "503", times=100)
    async with Flusher(world.settings(retry_attempts=3)) as flusher:
        report = await flusher.flush_once()
        assert not report.complete
        assert report.left == 1
        await world.assert_exact(all_delivered=False)
        world.emu.clear_faults()
        assert (await flusher.flush_once()).complete
    await world.assert_exact()


async def test_a_flusher_that_lost_its_lease_cannot_acknowledge(world: World) -> None:
    """Invariant 4: while the lease is stolen mid-send, the old flusher's acks are refused; the new
    holder resends the same stamped lines, which Stripe deduplicates, so nothing is billed twice."""
    targets = [world.subscribe(f"l{i}") for i in range(3)]
    await world.count([(t, 5) for t in targets])
    stolen: list[str] = []

    async def steal(at: str) -> None:
        if at == "sent" and not stolen:
            for shard in range(world.shards):
                # The old holder stalled past its TTL and another flusher took over (one atomic SET).
                fence = await world.redis.incr(world.layout.fence(shard))
                await world.redis.set(world.layout.lease(shard), f"{fence}:thief", px=60_000)
                stolen.append(f"{fence}:thief")

    async with Flusher(world.settings(), checkpoint=steal) as old:
        report = await old.flush_once()
    assert not report.complete
    # Stripe recorded the send, yet the line is still waiting: the stale holder's ack was refused.
    assert any(r["stripe"] and r["waiting"] for r in (await world.ledger()).values())
    for shard in range(world.shards):
        await world.redis.delete(world.layout.lease(shard))  # the thief "crashes"; its lease expires
    async with Flusher(world.settings()) as new:
        assert (await new.flush_once()).complete
    await world.assert_exact()


@pytest.mark.parametrize("world", ["usage_records", "meter_events"], indirect=True)
async def test_a_permanent_refusal_is_dead_lettered_and_can_be_redriven_after_a_fix(world: World) -> None:
    """Invariant 5: a deleted subscription item (usage records) or a deactivated meter (meter events)
    sends its lines to the dead-letter with Stripe's error; after the fix a re-drive delivers them."""
    good, bad = world.subscribe("good"), world.subscribe("bad")
    await world.count([(good, 2), (bad, 7)])
    item = world.make_unbillable(bad)  # the plan changed (a new item), or the meter was deactivated
    async with Flusher(world.settings()) as flusher:
        report = await flusher.flush_once()
        assert report.dead >= 1
        store = flusher.store
        dead = await store.dead_letters()
        assert {d.reason for d in dead} == {"refused"}
        assert all(d.error.get("status") in (400, 404) for d in dead)
        await world.assert_exact(all_delivered=False)
        if item is not None:
            moved = BillingTarget(**{**_fields(bad), "subscription_item": item})
            world.targets[moved.target_id] = moved
            world.counted[moved.target_id] = world.counted.pop(bad.target_id)
        else:
            world.client.v1.billing.meters.reactivate(world.meter)
        await store.redrive([d.id for d in dead], subscription_item=item)
        assert (await flusher.flush_once()).complete
    await world.assert_exact()


def _fields(target: BillingTarget) -> dict[str, Any]:
    return {
        f: getattr(target, f)
        for f in (
            "customer",
            "subscription_item",
            "subscription",
            "meter_event_name",
            "period_start",
            "period_end",
            "test_clock",
        )
    }


async def test_redis_restart_mid_flush_with_appendfsync_always_keeps_totals_exact(world: World) -> None:
    """Redis restarts (appendonly, fsync always) while lines are in flight: the next pass resends the
    persisted stamps identically and Stripe's totals match the counts."""
    with RedisServer(appendonly=True, appendfsync="always") as server:
        world.redis_url = server.url
        world.redis = aioredis.Redis.from_url(server.url)
        try:
            targets = [world.subscribe(f"r{i}") for i in range(4)]
            await world.count([(t, i + 2) for i, t in enumerate(targets)])
            restarted: list[bool] = []

            async def restart(at: str) -> None:
                if at == "sent" and not restarted:
                    restarted.append(True)
                    await anyio.to_thread.run_sync(server.restart)

            async with Flusher(world.settings(), checkpoint=restart) as flusher:
                await flusher.flush_once()
                assert restarted
                for _ in range(5):  # a pass that met the restart leaves lines; the next ones finish
                    if (report := await flusher.flush_once()).complete:
                        break
            assert report.complete, report
            await world.redis.aclose()  # its pooled connection died with the old process
            world.redis = aioredis.Redis.from_url(server.url)
            await world.assert_exact()
        finally:
            await world.redis.aclose()


async def test_run_delivers_in_the_background_and_flushes_on_stop(world: World) -> None:
    """``run()`` loops; counts made while it runs are delivered, and stop() ends with a final flush."""
    target = world.subscribe("bg")
    async with Flusher(world.settings(flush_interval=0.05)) as flusher, anyio.create_task_group() as tg:
        await tg.start(flusher.run)
        await world.count([(target, 4)])
        await anyio.sleep(0.2)
        await world.count([(target, 3)])
        flusher.stop()
    await world.assert_exact()


async def test_a_finished_pass_frees_its_shards_for_other_flushers_and_the_loop_keeps_them(
    world: World,
) -> None:
    """Several one-pass flushers started together: the first one done with a shard lets the next take it
    at once, instead of holding every shard it finished until it exits. A looping flusher keeps its shards
    between passes, so ``status`` names their owner."""
    world.shards = 4
    targets = [world.subscribe(f"f{i}") for i in range(8)]
    await world.count([(t, 2) for t in targets])

    async def leases() -> list[bytes | str | None]:
        return [await world.redis.get(world.layout.lease(s)) for s in range(4)]

    async with Flusher(world.settings(lease_ttl=30.0)) as first:
        assert (await first.flush_once()).complete
        assert await leases() == [None] * 4
        await world.count([(t, 1) for t in targets])
        async with Flusher(world.settings(lease_ttl=30.0)) as second:
            report = await second.flush_once(lease_wait=0.0)  # refused at once were any shard still held
        assert report.complete, report
        assert report.delivered == 8
    await world.assert_exact()

    looping = Flusher(world.settings(flush_interval=60, lease_ttl=30.0))
    async with looping, anyio.create_task_group() as tg:
        await tg.start(looping.run)
        with anyio.fail_after(10):
            while None in await leases():  # noqa: ASYNC110 - polling Redis, which has no event to wait on
                await anyio.sleep(0.02)
        await anyio.sleep(0.5)  # its first pass (nothing to send) is over: the shards are still its own
        assert None not in await leases()
        looping.stop()
    assert await leases() == [None] * 4  # released on close


@pytest.mark.parametrize("world", ["meter_events"], indirect=True)
async def test_a_pass_that_cannot_free_its_shards_is_still_complete(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis gone at the moment a finished shard is freed: everything was delivered, so the pass is
    complete (``flush --once`` exits 0); the lease simply expires."""
    targets = [world.subscribe(f"r{i}") for i in range(4)]
    await world.count([(t, 5) for t in targets])
    async with Flusher(world.settings()) as flusher:

        async def unreachable(shard: int, token: str) -> bool:
            raise StorageError("Redis is restarting")

        monkeypatch.setattr(flusher.store, "release_lease", unreachable)
        report = await flusher.flush_once()
    assert report.complete, report
    assert report.delivered == 4
    await world.assert_exact()


async def test_lifespan_runs_the_flusher_around_the_app_and_keeps_its_state(world: World) -> None:
    """The lifespan helper wraps the app's lifespan (its state passes through) and flushes at shutdown."""
    target = world.subscribe("app")

    @asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[dict[str, str]]:
        yield {"db": "ready"}

    lifespan = flusher_lifespan(world.settings(flush_interval=60), wraps=app_lifespan)
    async with lifespan(object()) as state:
        assert state == {"db": "ready"}
        await world.count([(target, 11)])
    await world.assert_exact()


async def test_a_line_first_attempted_beyond_the_horizon_goes_to_dead_letter_as_stale(world: World) -> None:
    """Invariant 8: a line whose first attempt is older than ``stale_after`` is never re-sent blindly."""
    target = world.subscribe("old")
    await world.count([(target, 6)])
    world.emu.inject("*", "503", times=1000)
    async with Flusher(world.settings(retry_attempts=1, stale_after=1.0)) as flusher:
        assert (await flusher.flush_once()).left == 1
        world.emu.clear_faults()
        await anyio.sleep(1.1)
        report = await flusher.flush_once()
        (dead,) = await flusher.store.dead_letters()
    assert report.dead == 1
    assert dead.reason == "stale"
    await world.assert_exact(all_delivered=False)


async def test_period_rollover_lands_usage_in_its_period_or_restamps_it_explicitly(world: World) -> None:
    """Invariant 6: usage flushed before a test clock crosses the period end lands in that period (its
    invoice matches); usage still pending then is re-stamped into the new period, counted and logged."""
    clock = world.client.v1.test_helpers.test_clocks.create({"frozen_time": world.emu.now()})
    target = world.subscribe("clocked", test_clock=clock.id)
    assert target.period_start is not None
    assert target.period_end is not None
    await world.count([(target, 5)])
    async with Flusher(world.settings()) as flusher:
        assert (await flusher.flush_once()).complete
        await world.count([(target, 3)])  # counted in the old period, not yet flushed
        world.client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": target.period_end + 60})
        report = await flusher.flush_once()
    assert report.complete
    assert report.restamped == 1
    assert world.stripe_total(target, period_start=target.period_start) == 5
    await world.assert_exact()
    closed = [
        i
        for i in world.emu.invoices(target.subscription)
        if i["period_start"] == target.period_start and i["billing_reason"] == "subscription_cycle"
    ]
    assert len(closed) == 1, world.emu.invoices(target.subscription)
    metered = [
        line
        for line in closed[0]["lines"]["data"]
        if line["pricing"]["price_details"]["price"] == world.price
    ]
    assert [line["quantity"] for line in metered] == [5]


class _StaggeredSink:
    """Answers each line as delivered after 1-15 ms, so concurrent sends finish spread out in time."""

    name = "staggered"
    batch_limit = 1

    def __init__(self) -> None:
        self.calls = 0

    def lock_key(self, line: SendLine) -> str:
        return line.target_id

    async def send(self, lines: Sequence[SendLine]) -> list[Outcome]:
        self.calls += 1
        await anyio.sleep(0.001 * (2 * (self.calls % 8) + 1))
        return [Outcome("delivered") for _ in lines]


async def test_acks_of_concurrent_sends_share_redis_round_trips(
    redis_client: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While other sends are in flight, delivered lines are acknowledged together, several per script call."""
    layout = Layout("mm", 1)
    targets = [BillingTarget(customer=f"cus_{i}", meter_event_name="api_requests") for i in range(48)]
    await count_as_middleware(redis_client, layout, "test", 1, [(t, 2) for t in targets])
    settings = DeliverySettings(
        stripe_api_key="sk_test_x", redis_url=redis_url, shards=1, rate_limit=0, max_concurrency=8
    )
    calls: list[int] = []
    async with Flusher(settings, redis=redis_client, sink=_StaggeredSink()) as flusher:
        ack = flusher.store.ack

        async def counting_ack(shard: int, seq: int, token: str, lines: Iterable[tuple[str, str]]) -> int:
            todo = list(lines)
            calls.append(len(todo))
            return await ack(shard, seq, token, todo)

        monkeypatch.setattr(flusher.store, "ack", counting_ack)
        report = await flusher.flush_once()
    assert report.complete, report
    assert report.delivered == sum(calls) == len(targets)
    assert await redis_client.hlen(layout.delivered(0)) == len(targets)
    assert len(calls) <= len(targets) // 4, calls
