"""The key layout against a real Redis: each target's bucket, small hashes, older one-hash keys still read."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from metered_middleware._delivery import DeliveryStore
from metered_middleware._inspect import target_usage
from metered_middleware._layout import BUCKETS, Layout
from metered_middleware._reconcile import _previous_start
from metered_middleware._store import CountStore, CountWrite, target_metadata
from metered_middleware._target import BillingTarget
from tests.helpers import pending_totals

pytestmark = pytest.mark.anyio

# A current period: usage hashes expire after their period's end (plus the retention).
START = int(time.time()) // 86_400 * 86_400 - 86_400


def target(n: int, item: str | None = None, start: int = START) -> BillingTarget:
    return BillingTarget(
        customer=f"cus_{n:05d}",
        subscription_item=item or f"si_{n:05d}",
        subscription=f"sub_{n:05d}",
        period_start=start,
        period_end=start + 2_592_000,
    )


async def count(
    redis: aioredis.Redis, layout: Layout, lines: list[tuple[BillingTarget, int]], seq: int = 1
) -> None:
    by_shard: dict[int, list[tuple[BillingTarget, int]]] = {}
    for t, units in lines:
        by_shard.setdefault(layout.shard_of(t.target_id), []).append((t, units))
    writes = [CountWrite(shard, "w", seq, part) for shard, part in by_shard.items()]
    assert await CountStore(redis, layout).apply(writes) == [True] * len(writes)


async def holders(redis: aioredis.Redis, names: list[str], field: str) -> dict[str, int]:
    """The hashes among ``names`` that hold ``field``, with its value."""
    out = {}
    for name in names:
        value = await redis.hget(name, field)
        if value is not None:
            out[name] = int(value)
    return out


async def test_the_count_script_puts_each_target_in_the_bucket_the_readers_look_in(
    redis_client: aioredis.Redis,
) -> None:
    """The script's bucket rule (in Lua) and Layout.bucket_of (in Python) agree for every target.

    Usage views, quotas and reconciliation read one target's bucket only; a disagreement would read 0.
    """
    layout = Layout("t", 2)
    targets = [target(n) for n in range(300)]
    await count(redis_client, layout, [(t, n + 1) for n, t in enumerate(targets)])
    store = CountStore(redis_client, layout)
    assert len({layout.bucket_of(t.target_id) for t in targets}) == BUCKETS  # every bucket is exercised
    for n, t in enumerate(targets):
        shard = layout.shard_of(t.target_id)
        bucket = layout.bucket_of(t.target_id)
        pending = await holders(redis_client, layout.pending_keys(shard), t.target_id)
        assert pending == {layout.pending(shard, bucket): n + 1}
        usage = await holders(redis_client, layout.usage_keys(shard, START), t.target_id)
        assert usage == {layout.usage(shard, START, bucket): n + 1}
        assert await store.period_usage(t) == n + 1


async def test_a_redriven_line_goes_to_its_new_targets_bucket_and_is_claimed(
    redis_client: aioredis.Redis,
) -> None:
    """The dead-letter re-drive (Lua) uses the same rule, including for a line moved onto a new item."""
    layout = Layout("t", 1)
    old = target(1, item="si_deleted")
    await count(redis_client, layout, [(old, 5)])
    store = DeliveryStore(redis_client, layout)
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    assert await store.claim(0, token, 10) is not None
    assert await store.dead_letter(0, 1, token, [(old.target_id, "", "refused", {})]) == 1
    (dead,) = await store.dead_letters()
    await store.redrive([dead.id], subscription_item="si_new")
    new_id = target(1, item="si_new").target_id
    bucket = layout.bucket_of(new_id)
    assert await holders(redis_client, layout.pending_keys(0), new_id) == {layout.pending(0, bucket): 5}
    claimed = await store.claim(0, token, 10)
    assert claimed is not None
    batch = await store.load(0, claimed[0])
    assert batch is not None
    assert [(line.target_id, line.units) for line in batch.lines] == [(new_id, 5)]


async def test_hashes_stay_small_with_a_thousand_keys_on_four_shards(redis_client: aioredis.Redis) -> None:
    """Redis scans a hash of up to 512 fields on each lookup; buckets keep each one short at this scale.

    With one hash per shard this held 250 fields each, and the count script cost Redis about 3x as much.
    """
    layout = Layout("t", 4)
    await count(redis_client, layout, [(target(n), 1) for n in range(1000)])
    sizes = []
    for shard in range(4):
        for name in [*layout.pending_keys(shard)[1:], *layout.usage_keys(shard, START)]:
            sizes.append(await redis_client.hlen(name))
            assert (await redis_client.object("encoding", name)).decode() in ("ziplist", "listpack")
    assert sum(sizes) == 2000
    assert max(sizes) <= 40  # 15.6 a hash on average


async def test_counts_stored_in_one_hash_a_shard_by_earlier_versions_are_read_claimed_once_and_summed(
    redis_client: aioredis.Redis,
) -> None:
    """After an upgrade, units in the one-hash keys of earlier versions are neither lost nor billed twice.

    They count in the usage view, quotas and status, and the next claim takes them into the same line as
    the units counted since, in the target's bucket.
    """
    layout = Layout("t", 1)
    a, b = target(1), target(2)
    # What an earlier version's count script left: one pending and one usage hash a shard, and the metadata.
    for t, units in ((a, 5), (b, 2)):
        await redis_client.hincrby(layout.pending(0), t.target_id, units)
        await redis_client.hincrby(layout.usage(0, START), t.target_id, units)
        await redis_client.hset(layout.targets(0), t.target_id, target_metadata(t))
    await count(redis_client, layout, [(a, 3)])
    assert await CountStore(redis_client, layout).period_usage(a) == 8
    assert await pending_totals(redis_client, layout) == {a.target_id: 8, b.target_id: 2}
    assert await CountStore(redis_client, layout).pending() == {a.target_id: 8, b.target_id: 2}
    usage = await target_usage(redis_client, layout, a.target_id)
    assert (usage.counted, usage.pending) == (8, 8)
    store = DeliveryStore(redis_client, layout)
    assert (await store.totals())["pending"] == {a.target_id: 8, b.target_id: 2}
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    claimed = await store.claim(0, token, 10)
    assert claimed is not None
    batch = await store.load(0, claimed[0])
    assert batch is not None
    assert sorted((line.target_id, line.units) for line in batch.lines) == [
        (a.target_id, 8),
        (b.target_id, 2),
    ]
    assert [line.meta.get("period_start") for line in batch.lines] == [START, START]
    assert await pending_totals(redis_client, layout) == {}
    assert await store.claim(0, token, 10) is None
    # The period's usage in the old hash is kept (until it expires) for reconciliation's look back.
    assert await _previous_start(redis_client, layout, a.target_id, START + 2_592_000) == START


async def test_a_full_batch_leaves_the_rest_pending_and_no_unit_is_claimed_twice(
    redis_client: aioredis.Redis,
) -> None:
    """Claims bounded by max lines, over the unbucketed hash and the buckets, take every unit exactly once."""
    layout = Layout("t", 1)
    targets = [target(n) for n in range(40)]
    for t in targets[:15]:  # some counted before the upgrade, some of those counted again after
        await redis_client.hincrby(layout.pending(0), t.target_id, 100)
    await count(redis_client, layout, [(t, n + 1) for n, t in enumerate(targets[5:])])
    expected = {t.target_id: (100 if n < 15 else 0) + (n - 4 if n >= 5 else 0) for n, t in enumerate(targets)}
    store = DeliveryStore(redis_client, layout)
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    claimed: dict[str, int] = {}
    while (result := await store.claim(0, token, 7)) is not None:
        assert result[2] <= 7
        batch = await store.load(0, result[0])
        assert batch is not None
        assert len({line.target_id for line in batch.lines}) == len(batch.lines)
        for line in batch.lines:
            claimed[line.target_id] = claimed.get(line.target_id, 0) + line.units
    assert claimed == expected
    assert await pending_totals(redis_client, layout) == {}


def test_usage_hash_names_give_their_period_in_either_form() -> None:
    """Reconciliation finds past periods from key names: bucketed, unbucketed, and nothing else."""
    layout = Layout("mm", 4)
    assert layout.usage_period(layout.usage(2, START, 7)) == START
    assert layout.usage_period(layout.usage(2, START)) == START
    assert layout.usage_period(layout.pending(2, 7)) is None
    assert layout.usage_period(layout.targets(2)) is None
