"""The Redis key registry: keys are stored hashed, and can be revoked, rotated, listed and updated."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from metered_middleware import INACTIVE_STATUSES, BillingTarget, CachingResolver, KeyRegistry, hash_key
from metered_middleware._keys import key_id_of
from metered_middleware._redis import connect

pytestmark = pytest.mark.anyio

TARGET = BillingTarget(
    customer="cus_1",
    subscription="sub_1",
    subscription_item="si_1",
    meter_event_name="api_requests",
    plan="std",
)


async def all_redis_bytes(client: aioredis.Redis) -> bytes:
    """Every key name and value in the database, concatenated, to search for leaks."""
    parts: list[bytes | str] = []
    async for name in client.scan_iter():
        parts.append(name)
        kind = await client.type(name)
        if kind == b"hash":
            for k, v in (await client.hgetall(name)).items():
                parts += [k, v]
        elif kind == b"set":
            parts += list(await client.smembers(name))
        elif kind == b"string":
            parts.append(await client.get(name) or b"")
    return b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)


async def test_create_stores_only_the_hash(redis_client: aioredis.Redis) -> None:
    """The plain key appears nowhere in Redis; its SHA-256 does."""
    registry = KeyRegistry(redis_client, key_prefix="mk_")
    issued = await registry.create(TARGET, label="first")
    assert issued.key.startswith("mk_")
    dump = await all_redis_bytes(redis_client)
    assert issued.key.encode() not in dump
    assert issued.key[3:].encode() not in dump
    assert hash_key(issued.key).encode() in dump
    resolved = await registry.resolve(issued.key)
    assert resolved is not None
    assert resolved.customer == "cus_1"
    assert resolved.subscription_item == "si_1"
    assert resolved.meter_event_name == "api_requests"
    assert resolved.key_id == issued.key_id
    assert not resolved.revoked


async def test_pepper_changes_the_stored_hash(redis_client: aioredis.Redis) -> None:
    """With a pepper, a registry without it cannot resolve the key."""
    peppered = KeyRegistry(redis_client, pepper="s3cret")
    issued = await peppered.create(TARGET)
    assert await peppered.resolve(issued.key) is not None
    assert await KeyRegistry(redis_client).resolve(issued.key) is None


async def test_keys_resolve_after_redis_drops_the_pooled_connections(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """Redis closing idle connections (a restart, an idle timeout) must not turn the next key lookup into a
    "metering unavailable" refusal: the read goes out again on a fresh connection."""
    own = connect(redis_url)
    registry = KeyRegistry(own)
    issued = await registry.create(TARGET)
    assert await redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
    resolved = await registry.resolve(issued.key)
    assert resolved is not None
    assert resolved.customer == "cus_1"
    await own.aclose()


async def test_unknown_key_resolves_to_none(redis_client: aioredis.Redis) -> None:
    """A key the registry never issued resolves to None."""
    assert await KeyRegistry(redis_client).resolve("mk_nope") is None


async def test_revoke_by_key_or_id(redis_client: aioredis.Redis) -> None:
    """Revoking by the key or by its id marks it revoked and keeps the first revocation time."""
    registry = KeyRegistry(redis_client)
    a = await registry.create(TARGET)
    b = await registry.create(TARGET)
    rec_a = await registry.revoke(a.key)
    rec_b = await registry.revoke(b.key_id)
    assert rec_a is not None
    assert rec_b is not None
    assert rec_a.target.revoked
    assert rec_b.revoked_at is not None
    again = await registry.revoke(b.key_id)
    assert again is not None
    assert again.revoked_at == rec_b.revoked_at
    resolved = await registry.resolve(a.key)
    assert resolved is not None
    assert resolved.revoked
    assert await registry.revoke("key_doesnotexist0") is None


async def test_rotate_issues_new_key_and_revokes_old(redis_client: aioredis.Redis) -> None:
    """Rotation gives a working key for the same target; the old one is revoked."""
    registry = KeyRegistry(redis_client)
    old = await registry.create(TARGET)
    new = await registry.rotate(old.key_id)
    assert new is not None
    assert new.key != old.key
    resolved_new = await registry.resolve(new.key)
    resolved_old = await registry.resolve(old.key)
    assert resolved_new is not None
    assert resolved_old is not None
    assert resolved_new.customer == "cus_1"
    assert not resolved_new.revoked
    assert resolved_old.revoked


async def test_list_by_customer(redis_client: aioredis.Redis) -> None:
    """Listing returns every key's record, or one customer's, without the keys."""
    registry = KeyRegistry(redis_client)
    await registry.create(TARGET)
    await registry.create(TARGET)
    other = await registry.create(BillingTarget(customer="cus_2", subscription_item="si_2"))
    assert len(await registry.list()) == 3
    mine = await registry.list("cus_1")
    assert [r.target.customer for r in mine] == ["cus_1", "cus_1"]
    theirs = await registry.list("cus_2")
    assert [r.key_id for r in theirs] == [other.key_id]


async def test_update_subscription_changes_every_key_on_it(redis_client: aioredis.Redis) -> None:
    """A webhook's new status and period reach all keys of the subscription, and only those."""
    registry = KeyRegistry(redis_client)
    a = await registry.create(TARGET)
    b = await registry.create(TARGET)
    c = await registry.create(BillingTarget(customer="cus_3", subscription="sub_3"))
    updated = await registry.update_subscription(
        "sub_1", status="past_due", period_start=100, period_end=200, test_clock="clock_1"
    )
    assert updated == 2
    for issued in (a, b):
        t = await registry.resolve(issued.key)
        assert t is not None
        assert (t.status, t.period_start, t.period_end, t.test_clock) == ("past_due", 100, 200, "clock_1")
    untouched = await registry.resolve(c.key)
    assert untouched is not None
    assert untouched.status == "active"
    await registry.update_subscription("sub_1", status="canceled")
    canceled = await registry.resolve(a.key)
    assert canceled is not None
    assert not canceled.active


@pytest.mark.parametrize(
    ("changes", "admissible"),
    [
        ({}, True),
        ({"status": "trialing"}, True),
        ({"status": "past_due"}, True),
        ({"revoked": True}, False),
        *(({"status": status}, False) for status in sorted(INACTIVE_STATUSES)),
    ],
)
def test_admissible_is_derived_from_revocation_and_status(changes: dict[str, Any], admissible: bool) -> None:
    """The middleware's fast path trusts ``admissible``; it must agree with ``revoked`` and ``active``."""
    target = replace(TARGET, **changes)
    assert target.admissible is admissible
    assert target.admissible == (not target.revoked and target.active)
    assert BillingTarget.from_fields(target.to_fields()).admissible is admissible


async def test_changes_to_existing_keys_are_counted_and_new_keys_are_not(
    redis_client: aioredis.Redis,
) -> None:
    """A revocation and a subscription update each move the change count once; issuing a key does not
    (no entry a cache holds changed). The count read with an entry is the count before it."""
    registry = KeyRegistry(redis_client)
    issued = await registry.create(TARGET)
    assert await registry.changes() == 0
    await registry.update_subscription("sub_1", status="past_due")
    assert await registry.changes() == 1
    await registry.create(TARGET)
    assert await registry.changes() == 1
    await registry.revoke(issued.key)
    target, count = await registry.resolve_counted(issued.key)
    assert target is not None
    assert target.revoked
    assert count == await registry.changes() == 2
    assert await registry.resolve_counted("mk_unknown") == (None, 2)


async def test_a_change_made_elsewhere_reaches_a_cache_at_its_next_expiry(redis_url: str) -> None:
    """Another process (its own client) revokes a key and moves a subscription: a cache that keeps its
    entries while nothing changes reads them again at their next expiry, and serves the new answers."""
    here, elsewhere = connect(redis_url), connect(redis_url)
    try:
        registry = KeyRegistry(here)
        cache = CachingResolver(registry, ttl=0.5, changes_max_age=0)
        kept, revoked = (await registry.create(TARGET)).key, (await registry.create(TARGET)).key
        for key in (kept, revoked):
            assert (await cache.resolve(key)) == replace(TARGET, key_id=key_id_of(hash_key(key)))
        await asyncio.sleep(0.52)
        await cache.resolve(kept)
        # Nothing changed: both kept without a lookup (the second with the count read for the first).
        assert (cache.lookups, cache.renewed) == (2, 2)
        assert cache.cached(revoked)[2]

        await KeyRegistry(elsewhere).revoke(revoked)
        await KeyRegistry(elsewhere).update_subscription("sub_1", period_start=100, period_end=200)
        await asyncio.sleep(0.52)
        after_revoke = await cache.resolve(revoked)
        after_update = await cache.resolve(kept)
        assert after_revoke is not None
        assert after_revoke.revoked
        assert after_update is not None
        assert (after_update.period_start, after_update.period_end) == (100, 200)
        assert cache.lookups == 4  # both read again in full
    finally:
        await here.aclose()
        await elsewhere.aclose()
