"""A small billing world on the Stripe emulator for the operations tests: a meter, a price, subscriptions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
import stripe

from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._flusher import Flusher
from metered_middleware._layout import Layout
from metered_middleware._target import BillingTarget
from metered_middleware.testing.emulator import StripeEmulator
from tests.helpers import count_as_middleware

EVENT = "api_requests"
LEGACY = "2025-02-24.acacia"
SHARDS = 4


@dataclass
class Billing:
    """Stripe objects for one sink, and the usage the test counted."""

    emu: StripeEmulator
    sink: str
    redis_url: str
    client: stripe.StripeClient = field(init=False)
    price: str = field(init=False)
    counted: dict[str, int] = field(default_factory=dict)
    _seq: int = 0

    def __post_init__(self) -> None:
        legacy = self.sink == "usage_records"
        self.client = self.emu.client(stripe_version=LEGACY) if legacy else self.emu.client()
        meter = self.client.v1.billing.meters.create(
            {"display_name": "API", "event_name": EVENT, "default_aggregation": {"formula": "sum"}}
        )
        recurring: dict[str, Any] = {"interval": "month", "usage_type": "metered"}
        if not legacy:
            recurring["meter"] = meter.id
        params: Any = {"currency": "usd", "unit_amount": 1, "recurring": recurring}
        params["product_data"] = {"name": "API"}
        self.price = self.client.v1.prices.create(params).id

    layout = Layout("mm", SHARDS)

    def subscribe(self, name: str) -> BillingTarget:
        """A customer subscribed to the metered price, as the middleware would resolve it."""
        customer = self.client.v1.customers.create({"name": name})
        sub = self.client.v1.subscriptions.create({"customer": customer.id, "items": [{"price": self.price}]})
        item = sub["items"]["data"][0]
        return BillingTarget(
            customer=customer.id,
            subscription_item=item["id"],
            subscription=sub.id,
            meter_event_name=EVENT,
            period_start=int(item["current_period_start"]),
            period_end=int(item["current_period_end"]),
        )

    async def count(self, redis: aioredis.Redis, lines: list[tuple[BillingTarget, int]]) -> None:
        """Count usage exactly as the middleware does."""
        for target, units in lines:
            self.counted[target.target_id] = self.counted.get(target.target_id, 0) + units
        self._seq += 1
        await count_as_middleware(redis, self.layout, "ops-test", self._seq, lines)

    def settings(self, **overrides: Any) -> DeliverySettings:
        """Flusher settings for this emulator and Redis, tuned for fast tests."""
        values: dict[str, Any] = {
            "stripe_api_key": "sk_test_emulator",
            "redis_url": self.redis_url,
            "shards": SHARDS,
            "sink": self.sink,
            "meter_event_name": EVENT,
            "api_base": self.emu.url,
            "rate_limit": 0,
            "retry_backoff": 0.01,
            "retry_backoff_max": 0.05,
            "lease_ttl": 2.0,
            "request_timeout": 5.0,
        }
        values.update(overrides)
        return DeliverySettings(**values)

    def env(self) -> dict[str, str]:
        """The same settings as the CLI reads them."""
        return {
            "STRIPE_API_KEY": "sk_test_emulator",
            "METERED_REDIS_URL": self.redis_url,
            "METERED_SHARDS": str(SHARDS),
            "METERED_SINK": self.sink,
            "METERED_METER_EVENT_NAME": EVENT,
            "METERED_STRIPE_API_BASE": self.emu.url,
        }

    async def flush(self) -> None:
        """One complete delivery pass."""
        async with Flusher(self.settings()) as flusher:
            report = await flusher.flush_once()
        assert report.complete, report

    def add_stripe_usage(self, target: BillingTarget, units: int, timestamp: int) -> None:
        """Usage written to Stripe behind the meter's back: the drift reconcile must find."""
        if self.sink == "usage_records":
            self.client.raw_request(
                "post",
                f"/v1/subscription_items/{target.subscription_item}/usage_records",
                quantity=units,
                timestamp=timestamp,
                action="increment",
                stripe_version=LEGACY,
            )
        else:
            self.client.v1.billing.meter_events.create(
                {
                    "event_name": EVENT,
                    "payload": {"stripe_customer_id": target.customer, "value": str(units)},
                    "timestamp": timestamp,
                }
            )


@pytest.fixture
def emulator(stripe_emulator: StripeEmulator) -> Iterator[StripeEmulator]:
    """The reset emulator; clients it made are closed after the test."""
    try:
        yield stripe_emulator
    finally:
        stripe_emulator.close_clients()


@pytest.fixture(params=["meter_events", "usage_records"])
def billing(request: pytest.FixtureRequest, emulator: StripeEmulator, redis_url: str) -> Billing:
    """A billing world for each summary mechanism reconcile reads (meter events, usage records)."""
    return Billing(emulator, request.param, redis_url)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The SDK's HTTPXClient posts raw ``data=``, which httpx deprecates; that is the SDK's business."""
    for item in items:
        if "tests/ops/" in item.nodeid or "tests/cluster/" in item.nodeid:
            item.add_marker(pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"))
