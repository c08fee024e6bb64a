"""Reconciliation against Stripe's totals: a clean run passes, injected drift is found and named."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from metered_middleware import cli
from metered_middleware._delivery import DeliveryStore

from .conftest import Billing

T = TypeVar("T")


def with_redis(url: str, action: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run one async step against the session's Redis with a client of its own."""

    async def run() -> T:
        client = aioredis.Redis.from_url(url)
        try:
            return await action(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str], *argv: str
) -> tuple[int, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def delivered_world(billing: Billing, units: list[int]) -> list[Any]:
    targets = [billing.subscribe(f"c{i}") for i in range(len(units))]

    async def step(redis: aioredis.Redis) -> None:
        await redis.flushdb()
        await billing.count(redis, list(zip(targets, units, strict=True)))
        await billing.flush()

    with_redis(billing.redis_url, step)
    return targets


def test_clean_run_reconciles_without_drift(
    billing: Billing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a complete flush, every target's delivered units equal Stripe's total and the exit code is 0."""
    targets = delivered_world(billing, [7, 30, 1])
    code, out = run_cli(monkeypatch, capsys, billing.env(), "reconcile", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["drift"] is False
    assert {line["target_id"]: (line["delivered"], line["stripe"]) for line in report["lines"]} == {
        t.target_id: (u, u) for t, u in zip(targets, [7, 30, 1], strict=True)
    }


def test_injected_drift_is_reported_with_its_target(
    billing: Billing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Usage added in Stripe behind the meter's back is drift: exit 1, the target named, the excess given."""
    targets = delivered_world(billing, [5, 9])
    billing.add_stripe_usage(targets[1], 4, timestamp=billing.emu.now())
    code, out = run_cli(monkeypatch, capsys, billing.env(), "reconcile")
    assert code == 1
    drift_lines = [line for line in out.splitlines() if line.startswith("drift")]
    assert len(drift_lines) == 1
    assert targets[1].target_id in drift_lines[0]
    assert "delivered 9  stripe 13" in drift_lines[0]
    assert "drift +4" in drift_lines[0]


def test_units_missing_from_stripe_are_drift(
    billing: Billing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A delivered count Stripe does not hold (the ledger says more than Stripe) is negative drift."""
    targets = delivered_world(billing, [6])
    layout = billing.layout

    async def overstate(redis: aioredis.Redis) -> None:
        # As if a count had been acknowledged without Stripe ever recording it.
        await billing.count(redis, [(targets[0], 2)])
        for name in layout.target_pending_keys(targets[0].target_id):
            await redis.hdel(name, targets[0].target_id)

    with_redis(billing.redis_url, overstate)
    code, out = run_cli(monkeypatch, capsys, billing.env(), "reconcile", "--json")
    line = json.loads(out)["lines"][0]
    assert code == 1
    assert (line["delivered"], line["stripe"], line["drift"]) == (8, 6, -2)


def test_dead_lettered_lines_are_listed_and_not_drift(
    billing: Billing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Units Stripe refused for good are neither delivered nor drift; reconcile points at the dead-letter."""
    targets = delivered_world(billing, [3])
    layout = billing.layout
    shard = layout.shard_of(targets[0].target_id)

    async def refuse(redis: aioredis.Redis) -> None:
        await billing.count(redis, [(targets[0], 4)])
        store = DeliveryStore(redis, layout)
        token = await store.acquire_lease(shard, "test", 5000)
        assert token
        claimed = await store.claim(shard, token, 10)
        assert claimed
        error = {"message": "No such customer"}
        await store.dead_letter(shard, claimed[0], token, [(targets[0].target_id, "", "refused", error)])
        await store.release_lease(shard, token)

    with_redis(billing.redis_url, refuse)
    code, out = run_cli(monkeypatch, capsys, billing.env(), "reconcile", "--json")
    line = json.loads(out)["lines"][0]
    assert code == 0
    assert (line["counted"], line["delivered"], line["dead"], line["stripe"]) == (7, 3, 4, 3)
    assert any("dead-letter" in hint and "refused" in hint for hint in line["look_at"])
