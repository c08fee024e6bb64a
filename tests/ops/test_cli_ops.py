"""``status`` and ``usage``: what an operator sees per shard and per customer or key."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from metered_middleware import KeyRegistry
from metered_middleware._delivery import DeliveryStore

from .conftest import SHARDS, Billing
from .test_reconcile import run_cli, with_redis


@pytest.mark.parametrize("billing", ["meter_events"], indirect=True)
def test_status_shows_pending_batches_lease_and_dead_letter(
    billing: Billing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per shard: pending units, a claimed batch, the lease holder's name and the dead-letter size."""
    a, b = billing.subscribe("a"), billing.subscribe("b")
    layout = billing.layout
    shard_a = layout.shard_of(a.target_id)

    async def setup(redis: aioredis.Redis) -> None:
        await redis.flushdb()
        await billing.count(redis, [(a, 5)])
        store = DeliveryStore(redis, layout)
        token = await store.acquire_lease(shard_a, "worker-7", 60_000)
        assert token
        claimed = await store.claim(shard_a, token, 10)
        assert claimed
        await store.dead_letter(shard_a, claimed[0], token, [(a.target_id, "", "refused", {"message": "no"})])
        await billing.count(redis, [(a, 2), (b, 4)])

    with_redis(billing.redis_url, setup)
    code, out = run_cli(monkeypatch, capsys, billing.env(), "status", "--json")
    shards = {s["shard"]: s for s in json.loads(out)["shards"]}
    assert code == 0
    assert len(shards) == SHARDS
    assert shards[shard_a]["lease_holder"] == "worker-7"
    assert shards[shard_a]["dead_letters"] == 1
    assert shards[shard_a]["dead_units"] == 5
    assert sum(s["pending_units"] for s in shards.values()) == 6
    assert shards[shard_a]["pending_age"] is not None
    assert all(s["batches"] == 0 for s in shards.values())  # the only batch was emptied into the dead-letter
    assert json.loads(out)["layout"] == {"shards": SHARDS, "buckets": 16, "recorded": True}

    code, text = run_cli(monkeypatch, capsys, billing.env(), "status")
    assert code == 0
    assert "worker-7" in text
    assert text.splitlines()[0].split()[:3] == ["shard", "pending", "age"]
    assert text.splitlines()[-1] == f"layout: {SHARDS} shards x 16 buckets, recorded in Redis"


@pytest.mark.parametrize("billing", ["meter_events"], indirect=True)
def test_usage_by_customer_and_key_id(
    billing: Billing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``usage`` splits this period's count into delivered and pending, by customer or by key id."""
    target = billing.subscribe("u")

    async def setup(redis: aioredis.Redis) -> str:
        await redis.flushdb()
        issued = await KeyRegistry(redis).create(target)
        await billing.count(redis, [(target, 10)])
        await billing.flush()
        await billing.count(redis, [(target, 3)])
        return issued.key_id

    key_id = with_redis(billing.redis_url, setup)
    code, out = run_cli(monkeypatch, capsys, billing.env(), "usage", "--customer", target.customer, "--json")
    assert code == 0
    [row] = json.loads(out)
    assert (row["counted"], row["delivered"], row["pending"], row["period_start"]) == (
        13,
        10,
        3,
        target.period_start,
    )
    code, text = run_cli(monkeypatch, capsys, billing.env(), "usage", "--key-id", key_id)
    assert code == 0
    assert "counted 13  delivered 10  pending 3" in text
    code, _ = run_cli(monkeypatch, capsys, billing.env(), "usage", "--customer", "cus_nobody")
    assert code == 1
