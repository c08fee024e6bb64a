"""Reconciliation: what Redis says was delivered, per target and period, against Stripe's own totals.

For each billing target the middleware counted in the period, Redis knows what was counted, what still waits
(pending or in a claimed batch) and what was dead-lettered; the rest was acknowledged by Stripe. Stripe's
side is the usage record summary of the subscription item (legacy usage records) or the meter event
summary of the customer over the period (meter events, v1 and v2). A line sent but not yet acknowledged may
already be in Stripe, and a ``stale`` dead-letter may have landed or not: both widen the accepted range
instead of counting as drift. Anything outside that range is drift, reported with the lines to look at.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
import stripe

from metered_middleware._delivery import DeadLetter, DeliveryStore
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._errors import MeteringError, StorageError
from metered_middleware._inspect import target_usage
from metered_middleware._layout import Layout
from metered_middleware._redis import REDIS_FAILURES
from metered_middleware._target import parse_target_id

__all__ = ["ReconcileLine", "ReconcileReport", "reconcile"]

Period = Literal["current", "previous"]


@dataclass(frozen=True, slots=True)
class ReconcileLine:
    """One target in one period: our ledger, Stripe's total, and the verdict."""

    target_id: str
    customer: str
    subscription_item: str | None
    event_name: str | None
    period_start: int
    period_end: int
    counted: int
    delivered: int
    in_flight: int
    pending: int
    dead: int
    stale: int
    stripe: int
    look_at: list[str] = field(default_factory=list)

    @property
    def drift(self) -> int:
        """Units Stripe holds beyond (+) or short of (-) what the ledger allows; 0 inside that range."""
        high = self.delivered + self.in_flight + self.stale
        if self.stripe > high:
            return self.stripe - high
        if self.stripe < self.delivered:
            return self.stripe - self.delivered
        return 0

    @property
    def status(self) -> str:
        """``ok``, ``unsettled`` (sent or stale lines may explain a difference) or ``drift``."""
        if self.drift:
            return "drift"
        return "ok" if self.stripe == self.delivered else "unsettled"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields, verdict included."""
        return asdict(self) | {"drift": self.drift, "status": self.status}


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """Every target reconciled for one period."""

    period: Period
    sink: str
    lines: list[ReconcileLine]

    @property
    def drifted(self) -> list[ReconcileLine]:
        """Lines whose Stripe total is outside what the ledger allows."""
        return [line for line in self.lines if line.drift]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready report."""
        return {
            "period": self.period,
            "sink": self.sink,
            "drift": bool(self.drifted),
            "lines": [line.as_dict() for line in self.lines],
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _targets(redis: aioredis.Redis, layout: Layout) -> dict[str, dict[str, Any]]:
    """Every target the middleware counted, with the latest period bounds stored for it."""
    out: dict[str, dict[str, Any]] = {}
    for shard in range(layout.shards):
        for name, raw in (await redis.hgetall(layout.targets(shard))).items():
            meta = json.loads(raw) if raw else {}
            out[_text(name)] = meta if isinstance(meta, dict) else {}
    return out


async def _previous_start(redis: aioredis.Redis, layout: Layout, target_id: str, current: int) -> int | None:
    """The latest period before ``current`` the target was counted in (from the per-period usage keys)."""
    shard = layout.shard_of(target_id)
    starts: list[int] = []
    async for key in redis.scan_iter(match=layout.usage(shard, 0)[:-1] + "*", count=500):
        name = _text(key)
        start = layout.usage_period(name)
        # Only the target's own bucket (or the unbucketed hash of earlier versions) can hold it.
        if start is None or start >= current or name not in layout.target_usage_keys(target_id, start):
            continue
        if await redis.hexists(name, target_id):
            starts.append(start)
    return max(starts, default=None)


class _Stripe:
    """Stripe's totals, through the official SDK."""

    def __init__(self, client: stripe.StripeClient, settings: DeliverySettings) -> None:
        self.client = client
        self.settings = settings
        self._meters: dict[str, str] | None = None

    async def total(self, line: dict[str, Any]) -> int:
        if self.settings.sink == "usage_records":
            return await self._usage_records(line["subscription_item"], line["period_start"])
        return await self._meter_events(
            line["event_name"], line["customer"], line["period_start"], line["period_end"]
        )

    async def _usage_records(self, item: str | None, period_start: int) -> int:
        if not item:
            return 0
        response = await self.client.raw_request_async(
            "get",
            f"/v1/subscription_items/{item}/usage_record_summaries",
            limit=100,
            stripe_version=self.settings.legacy_api_version,
        )
        data = json.loads(response.body)
        return sum(
            int(s["total_usage"]) for s in data.get("data", []) if int(s["period"]["start"]) == period_start
        )

    async def _meter_id(self, event_name: str) -> str | None:
        if self._meters is None:
            self._meters = {}
            meters = await self.client.v1.billing.meters.list_async({"limit": 100})
            async for meter in meters.auto_paging_iter():
                self._meters.setdefault(meter.event_name, meter.id)
        return self._meters.get(event_name)

    async def _meter_events(self, event_name: str | None, customer: str, start: int, end: int) -> int:
        meter = await self._meter_id(event_name) if event_name else None
        if meter is None:
            return 0
        page = await self.client.v1.billing.meters.event_summaries.list_async(
            meter, {"customer": customer, "start_time": start, "end_time": end, "limit": 100}
        )
        total = 0.0
        async for summary in page.auto_paging_iter():
            total += float(summary.aggregated_value)
        return int(total)


def _look_at(target_id: str, dead: Iterable[DeadLetter], batches: list[str]) -> list[str]:
    out = [f"dead-letter {d.id} ({d.reason}, {d.units} units)" for d in dead if d.target_id == target_id]
    out += [f"batch {b} in flight" for b in batches]
    return out


async def reconcile(
    redis: aioredis.Redis,
    layout: Layout,
    client: stripe.StripeClient,
    settings: DeliverySettings,
    *,
    period: Period = "current",
    customer: str | None = None,
) -> ReconcileReport:
    """Compare the ledger in Redis with Stripe's totals for every counted target (or one customer's)."""
    stripe_totals = _Stripe(client, settings)
    lines: list[ReconcileLine] = []
    try:
        targets = await _targets(redis, layout)
        store = DeliveryStore(redis, layout)
        dead_letters = await store.dead_letters()
        for target_id, meta in sorted(targets.items()):
            cust, item, event = parse_target_id(target_id)
            if customer is not None and cust != customer:
                continue
            start, end = meta.get("period_start"), meta.get("period_end")
            if not isinstance(start, int) or not isinstance(end, int):
                continue  # counted without a period: nothing in Stripe to compare with
            if period == "previous":
                end, previous = start, await _previous_start(redis, layout, target_id, start)
                if previous is None:
                    continue
                start = previous
            usage = await target_usage(redis, layout, target_id, period_start=start)
            shard = layout.shard_of(target_id)
            in_flight = [
                f"{shard}:{seq}"
                for seq in await store.batch_seqs(shard)
                if await redis.hexists(layout.batch(shard, seq), f"u:{target_id}")
            ]
            mine = [
                d for d in dead_letters if d.target_id == target_id and d.meta.get("period_start") == start
            ]
            stale = sum(d.units for d in mine if d.reason == "stale")
            fields: dict[str, Any] = {
                "target_id": target_id,
                "customer": cust,
                "subscription_item": item,
                "event_name": event or settings.meter_event_name,
                "period_start": start,
                "period_end": end,
            }
            try:
                total = await stripe_totals.total(fields)
            except stripe.StripeError as exc:
                raise MeteringError(f"reading Stripe's total for {target_id} failed: {exc}") from exc
            lines.append(
                ReconcileLine(
                    **fields,
                    counted=usage.counted,
                    delivered=usage.delivered,
                    in_flight=usage.claimed,
                    pending=usage.pending,
                    dead=usage.dead,
                    stale=stale,
                    stripe=total,
                    look_at=_look_at(target_id, mine, in_flight),
                )
            )
    except REDIS_FAILURES as exc:
        raise StorageError(f"reading the ledger failed: {exc}") from exc
    return ReconcileReport(period, settings.sink, lines)
