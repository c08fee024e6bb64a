"""A billing world on the Stripe emulator for the flusher tests: meters, prices, subscriptions, counts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
import stripe

from metered_middleware._delivery import DeliveryStore
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._layout import Layout
from metered_middleware._target import BillingTarget
from metered_middleware.testing.emulator import StripeEmulator
from tests.helpers import count_as_middleware

SINKS = ("meter_events", "usage_records", "meter_event_stream")
EVENT = "api_requests"
LEGACY = "2025-02-24.acacia"


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[StripeEmulator]:
    """One emulator for every flusher test (reset per test), without its rate limit."""
    emu = StripeEmulator(rate_limit=None).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def emulator(emulator_server: StripeEmulator) -> Iterator[StripeEmulator]:
    """The emulator, wiped before the test and its clients closed after it."""
    emulator_server.reset()
    emulator_server.rate_limit = None
    try:
        yield emulator_server
    finally:
        emulator_server.close_clients()


@dataclass
class World:
    """Stripe objects for one sink, and the counts the test made."""

    emu: StripeEmulator
    sink: str
    redis: aioredis.Redis
    redis_url: str
    shards: int = 2
    namespace: str = "mm"
    http_client: str = "auto"  # the flusher's transport to Stripe (METERED_HTTP_CLIENT): the default
    client: stripe.StripeClient = field(init=False)
    price: str = field(init=False)
    meter: str = field(init=False)
    counted: dict[str, int] = field(default_factory=dict)
    targets: dict[str, BillingTarget] = field(default_factory=dict)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.setup_stripe()

    def fork(self, namespace: str) -> World:
        """Another namespace (its own shards, leases, batches) on the same Stripe objects."""
        other = object.__new__(World)
        other.__dict__.update(self.__dict__)
        other.namespace, other.counted, other.targets, other._seq = namespace, {}, {}, 0
        return other

    def setup_stripe(self) -> None:
        """A meter and a metered price (legacy usage-based for usage records)."""
        legacy = self.sink == "usage_records"
        self.client = self.emu.client(stripe_version=LEGACY) if legacy else self.emu.client()
        existing = [m for m in self.client.v1.billing.meters.list().data if m.event_name == EVENT]
        meter = (
            existing[0]
            if existing
            else self.client.v1.billing.meters.create(
                {"display_name": "API", "event_name": EVENT, "default_aggregation": {"formula": "sum"}}
            )
        )
        self.meter = meter.id
        recurring: dict[str, Any] = {"interval": "month", "usage_type": "metered"}
        if not legacy:
            recurring["meter"] = meter.id
        params: Any = {"currency": "usd", "unit_amount": 1, "recurring": recurring}
        params["product_data"] = {"name": "API"}
        price = self.client.v1.prices.create(params)
        self.price = price.id

    @property
    def layout(self) -> Layout:
        return Layout(self.namespace, self.shards)

    def settings(self, **overrides: Any) -> DeliverySettings:
        """Flusher settings pointed at this emulator and Redis, tuned for fast tests."""
        values: dict[str, Any] = {
            "stripe_api_key": "sk_test_emulator",
            "redis_url": self.redis_url,
            "shards": self.shards,
            "namespace": self.namespace,
            "sink": self.sink,
            "meter_event_name": EVENT,
            "api_base": self.emu.url,
            "rate_limit": 0,
            "retry_backoff": 0.01,
            "retry_backoff_max": 0.05,
            "retry_attempts": 50,
            "lease_ttl": 2.0,
            "request_timeout": 5.0,
            "flush_interval": 0.05,
            "shutdown_grace": 5.0,
            "http_client": self.http_client,
        }
        values.update(overrides)
        return DeliverySettings(**values)

    def env(self, **overrides: str) -> dict[str, str]:
        """The same settings as environment variables, for flusher subprocesses."""
        env = {
            "STRIPE_API_KEY": "sk_test_emulator",
            "METERED_REDIS_URL": self.redis_url,
            "METERED_SHARDS": str(self.shards),
            "METERED_NAMESPACE": self.namespace,
            "METERED_SINK": self.sink,
            "METERED_METER_EVENT_NAME": EVENT,
            "METERED_STRIPE_API_BASE": self.emu.url,
            "METERED_RATE_LIMIT": "off",
            "METERED_RETRY_BACKOFF": "0.01",
            "METERED_RETRY_BACKOFF_MAX": "0.05",
            "METERED_RETRY_ATTEMPTS": "50",
            "METERED_LEASE_TTL": "1",
            "METERED_STRIPE_TIMEOUT": "5",
            "METERED_HTTP_CLIENT": self.http_client,
        }
        env.update(overrides)
        return env

    def subscribe(self, name: str, *, test_clock: str | None = None) -> BillingTarget:
        """A customer with an active subscription to the metered price, as the middleware resolves it."""
        params: dict[str, Any] = {"name": name}
        if test_clock:
            params["test_clock"] = test_clock
        customer = self.client.v1.customers.create(params)  # type: ignore[arg-type]
        sub = self.client.v1.subscriptions.create({"customer": customer.id, "items": [{"price": self.price}]})
        item = sub["items"]["data"][0]
        target = BillingTarget(
            customer=customer.id,
            subscription_item=item["id"],
            subscription=sub.id,
            meter_event_name=EVENT,
            period_start=int(item["current_period_start"]),
            period_end=int(item["current_period_end"]),
            test_clock=test_clock,
        )
        self.targets[target.target_id] = target
        return target

    def make_unbillable(self, target: BillingTarget) -> str | None:
        """Make Stripe refuse the target's usage for good; for usage records, return the replacing item.

        Usage records: the plan changed, a new item replaced the one the target still points at. Meter
        events: the meter is deactivated.
        """
        if self.sink != "usage_records":
            self.client.v1.billing.meters.deactivate(self.meter)
            return None
        assert target.subscription_item
        assert target.subscription
        price: Any = {"currency": "usd", "unit_amount": 2, "product_data": {"name": "API v2"}}
        price["recurring"] = {"interval": "month", "usage_type": "metered"}
        new_price = self.client.v1.prices.create(price)
        item = self.client.v1.subscription_items.create(
            {"subscription": target.subscription, "price": new_price.id}
        ).id
        self.client.v1.subscription_items.delete(target.subscription_item)
        return item

    async def count(self, lines: list[tuple[BillingTarget, int]]) -> None:
        """Count usage exactly as the middleware does (one idempotent write per shard)."""
        for target, units in lines:
            self.counted[target.target_id] = self.counted.get(target.target_id, 0) + units
        self._seq += 1
        await count_as_middleware(self.redis, self.layout, "test", self._seq, lines)

    def stripe_total(self, target: BillingTarget, *, period_start: int | None = None) -> int:
        """Usage Stripe recorded for a target (in one period if given)."""
        if self.sink == "usage_records":
            assert target.subscription_item
            return self.emu.usage_record_total(target.subscription_item, period_start=period_start)
        end = None
        if period_start is not None and target.period_start == period_start:
            end = target.period_end
        return self.emu.meter_event_total(target.customer, EVENT, start=period_start, end=end)

    async def ledger(self) -> dict[str, dict[str, int]]:
        """Per target: counted, recorded by Stripe, dead-lettered, still pending or claimed."""
        totals = await DeliveryStore(self.redis, self.layout).totals()
        return {
            tid: {
                "counted": units,
                "stripe": self.stripe_total(self.targets[tid]),
                "dead": totals["dead"].get(tid, 0),
                "waiting": totals["pending"].get(tid, 0) + totals["claimed"].get(tid, 0),
            }
            for tid, units in self.counted.items()
        }

    async def assert_exact(self, *, all_delivered: bool = True) -> None:
        """Stripe's usage + dead-letter + still pending == counted per target; no idempotency conflict."""
        for tid, row in (await self.ledger()).items():
            assert row["stripe"] + row["dead"] + row["waiting"] == row["counted"], (tid, row)
            if all_delivered:
                assert row["stripe"] == row["counted"], (tid, row)
        assert self.emu.idempotency_conflicts == 0
        self.assert_identical_resends()

    def assert_identical_resends(self) -> None:
        """Invariant 3: every request sharing a key / identifier carried identical parameters."""
        seen: dict[str, str] = {}
        for record in self.emu.requests():
            if not record.params:  # refused before its body was read (an injected 429/5xx)
                continue
            if record.operation == "meter_event_stream.create":
                sent = [(e["identifier"], json.dumps(e, sort_keys=True)) for e in record.params["events"]]
            elif record.operation in ("usage_records.create", "meter_events.create"):
                sent = [(record.idempotency_key or "", json.dumps(record.params, sort_keys=True))]
            else:
                continue
            for key, params in sent:
                assert seen.setdefault(key, params) == params, key


@pytest.fixture(params=SINKS)
def world(
    request: pytest.FixtureRequest, emulator: StripeEmulator, redis_client: aioredis.Redis, redis_url: str
) -> World:
    """A billing world for each sink in turn."""
    return World(emulator, request.param, redis_client, redis_url)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The emulator's setup client (the SDK's HTTPXClient) posts raw ``data=``, which httpx deprecates."""
    for item in items:
        if "tests/flusher/" in item.nodeid:
            item.add_marker(pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"))


@pytest.fixture
def world_all(emulator: StripeEmulator, redis_client: aioredis.Redis, redis_url: str) -> list[World]:
    """One billing world per sink, side by side on the same emulator."""
    return [World(emulator, sink, redis_client, redis_url) for sink in SINKS]
