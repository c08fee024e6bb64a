"""The delivery store against a real Redis: claims, stamps, fenced acknowledgements and the dead-letter."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from metered_middleware._delivery import DeliveryStore, LeaseLostError, line_key
from metered_middleware._layout import Layout
from metered_middleware._store import CountStore, CountWrite
from metered_middleware._target import BillingTarget

pytestmark = pytest.mark.anyio

LAYOUT = Layout("t", 1)


def target(customer: str = "cus_1", item: str = "si_1") -> BillingTarget:
    return BillingTarget(
        customer=customer,
        subscription_item=item,
        subscription="sub_1",
        meter_event_name="api_requests",
        period_start=1_000,
        period_end=2_000,
    )


async def count(redis: aioredis.Redis, lines: list[tuple[BillingTarget, int]], seq: int = 1) -> None:
    await CountStore(redis, LAYOUT).apply([CountWrite(0, "w", seq, lines)])


async def test_claim_moves_pending_into_a_numbered_batch_with_redis_claim_time(
    redis_client: aioredis.Redis,
) -> None:
    """Claiming empties pending into batch 1, keeping units and the target metadata seen at claim."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target("a"), 3), (target("b"), 4)])
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    seq, claimed_at, lines = await store.claim(0, token, 100) or (0, 0, 0)
    assert (seq, lines) == (1, 2)
    (now_s, _us) = await redis_client.time()
    assert abs(claimed_at - now_s * 1000) < 5_000
    assert await CountStore(redis_client, LAYOUT).pending() == {}
    batch = await store.load(0, 1)
    assert batch is not None
    assert [(line.target_id, line.units) for line in batch.lines] == [
        (target("a").target_id, 3),
        (target("b").target_id, 4),
    ]
    assert batch.lines[0].meta["period_end"] == 2_000
    assert await store.claim(0, token, 100) is None


async def test_claim_takes_at_most_max_lines_and_batches_are_listed_oldest_first(
    redis_client: aioredis.Redis,
) -> None:
    """A claim is bounded; the rest stays pending for the next, newer batch."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target(f"c{i}"), 1) for i in range(5)])
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    claimed = [await store.claim(0, token, 2) for _ in range(4)]
    assert [c[2] if c else None for c in claimed] == [2, 2, 1, None]
    assert await store.batch_seqs(0) == [1, 2, 3]


async def test_only_the_lease_holder_claims(redis_client: aioredis.Redis) -> None:
    """A flusher without the lease cannot claim; the counts stay pending."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target(), 1)])
    assert await store.acquire_lease(0, "f1", 5_000)
    assert await store.acquire_lease(0, "f2", 5_000) is None
    with pytest.raises(LeaseLostError):
        await store.claim(0, "1:f2", 10)
    assert await CountStore(redis_client, LAYOUT).pending() == {target().target_id: 1}


async def test_lease_renews_for_its_holder_and_a_new_holder_gets_a_higher_fence(
    redis_client: aioredis.Redis,
) -> None:
    """Renewal keeps the token; after release the next flusher's token carries the next fence number."""
    store = DeliveryStore(redis_client, LAYOUT)
    first = await store.acquire_lease(0, "f1", 5_000)
    assert first == "1:f1"
    assert await store.acquire_lease(0, "f1", 5_000, first) == first
    assert await store.release_lease(0, first)
    assert await store.acquire_lease(0, "f2", 5_000) == "2:f2"
    assert not await store.release_lease(0, first)


async def test_a_stamp_is_stored_once_so_every_retry_sends_identical_parameters(
    redis_client: aioredis.Redis,
) -> None:
    """A second stamp attempt (another flusher, a retry) reads back the first one unchanged."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target(), 2)])
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    await store.claim(0, token, 10)
    tid = target().target_id
    (first,) = await store.stamp(0, 1, token, [(tid, "1|1500|key-a")])
    (again,) = await store.stamp(0, 1, token, [(tid, "1|1600|key-b")])
    assert first is not None
    assert again == first
    assert (first.attempt, first.timestamp, first.key) == (1, 1500, "key-a")
    batch = await store.load(0, 1)
    assert batch is not None
    assert batch.lines[0].stamp == first


async def test_a_lost_lease_cannot_acknowledge(redis_client: aioredis.Redis) -> None:
    """Invariant 4: once the lease passed on, the old holder's ack is refused and nothing moves."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target(), 2)])
    old = await store.acquire_lease(0, "f1", 5_000)
    assert old
    await store.claim(0, old, 10)
    tid = target().target_id
    (stamp,) = await store.stamp(0, 1, old, [(tid, "1|1500|k")])
    assert stamp
    await redis_client.delete(LAYOUT.lease(0))  # the lease expired while f1 was paused
    new = await store.acquire_lease(0, "f2", 5_000)
    assert new
    with pytest.raises(LeaseLostError):
        await store.ack(0, 1, old, [(tid, stamp.raw)])
    with pytest.raises(LeaseLostError):
        await store.dead_letter(0, 1, old, [(tid, stamp.raw, "x", {})])
    assert await store.batch_seqs(0) == [1]
    assert await store.ack(0, 1, new, [(tid, stamp.raw)]) == 1
    assert await store.batch_seqs(0) == []
    totals = await store.totals()
    assert totals["delivered"] == {tid: 2}
    assert totals["claimed"] == {}


async def test_ack_counts_once_and_ignores_a_stamp_that_was_replaced(
    redis_client: aioredis.Redis,
) -> None:
    """Acknowledging twice moves units once; an ack carrying an outdated stamp does nothing."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target("a"), 2), (target("b"), 5)])
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    await store.claim(0, token, 10)
    a, b = target("a").target_id, target("b").target_id
    sa, sb = await store.stamp(0, 1, token, [(a, "1|1|ka"), (b, "1|1|kb")])
    assert sa
    assert sb
    newer = await store.restamp(0, 1, token, b, sb, "2|2|kb2")
    assert newer is not None
    assert newer.attempt == 2
    assert await store.restamp(0, 1, token, b, sb, "3|3|kb3") is None
    assert await store.ack(0, 1, token, [(a, sa.raw), (b, sb.raw)]) == 1
    assert await store.ack(0, 1, token, [(a, sa.raw)]) == 0
    assert await store.ack(0, 1, token, [(b, newer.raw)]) == 1
    assert (await store.totals())["delivered"] == {a: 2, b: 5}
    assert await redis_client.exists(LAYOUT.batch(0, 1)) == 0


async def test_dead_letter_keeps_the_error_and_redrive_returns_units_to_pending(
    redis_client: aioredis.Redis,
) -> None:
    """A refused line is kept with Stripe's error; re-driving claims it into a new batch with a new key."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target("a"), 7)])
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    await store.claim(0, token, 10)
    tid = target("a").target_id
    (stamp,) = await store.stamp(0, 1, token, [(tid, "1|1|k")])
    assert stamp
    error = {"type": "invalid_request_error", "message": "No such subscription item"}
    assert await store.dead_letter(0, 1, token, [(tid, stamp.raw, "refused", error)]) == 1
    (dead,) = await store.dead_letters()
    assert (dead.id, dead.units, dead.reason, dead.error) == (f"0:1:{tid}", 7, "refused", error)
    assert await store.batch_seqs(0) == []
    moved = await store.redrive([dead.id])
    assert [d.id for d in moved] == [dead.id]
    assert await store.dead_letters() == []
    assert await CountStore(redis_client, LAYOUT).pending() == {tid: 7}
    claimed = await store.claim(0, token, 10)
    assert claimed is not None
    assert (claimed[0], claimed[2]) == (2, 1)


async def test_discard_removes_only_the_named_entries(redis_client: aioredis.Redis) -> None:
    """Discarding is explicit and per entry; other dead letters stay."""
    store = DeliveryStore(redis_client, LAYOUT)
    await count(redis_client, [(target("a"), 1), (target("b"), 1)])
    token = await store.acquire_lease(0, "f1", 5_000)
    assert token
    await store.claim(0, token, 10)
    a, b = target("a").target_id, target("b").target_id
    await store.dead_letter(0, 1, token, [(a, "", "r", {}), (b, "", "r", {})])
    removed = await store.discard([f"0:1:{a}"])
    assert [d.target_id for d in removed] == [a]
    assert [d.target_id for d in await store.dead_letters()] == [b]
    assert await CountStore(redis_client, LAYOUT).pending() == {}
    with pytest.raises(ValueError, match="not a dead-letter id"):
        await store.discard(["nonsense"])


def test_line_key_is_a_pure_function_of_the_batch() -> None:
    """The same batch line gives the same key; another attempt or claim time gives another."""
    key = line_key("mm", 1, 7, 1000, 1, "cus|si|ev")
    assert key == line_key("mm", 1, 7, 1000, 1, "cus|si|ev")
    assert key != line_key("mm", 1, 7, 1000, 2, "cus|si|ev")
    assert key != line_key("mm", 1, 7, 1001, 1, "cus|si|ev")
    assert len(key) <= 100
