"""Helpers shared by the emulator tests: a priced, subscribed customer in a few calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import stripe

LEGACY = "2025-02-24.acacia"

STANDARD_TIERS: list[dict[str, Any]] = [
    {"up_to": 10000, "flat_amount": 1000, "unit_amount": 0},
    {"up_to": "inf", "unit_amount": 10},
]


@dataclass
class Metered:
    """A customer subscribed to one metered price."""

    customer: str
    subscription: str
    item: str
    price: str
    meter: str | None
    period_start: int
    period_end: int


def make_meter(client: stripe.StripeClient, event_name: str = "api_requests") -> str:
    meter = client.v1.billing.meters.create(
        {
            "display_name": "API requests",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
        }
    )
    return meter.id


def subscribe(
    client: stripe.StripeClient,
    *,
    tiers: list[dict[str, Any]] | None = None,
    legacy: bool = False,
    event_name: str = "api_requests",
    test_clock: str | None = None,
    extra_licensed: bool = False,
    tiers_mode: str = "graduated",
) -> Metered:
    """A customer on a metered price (meter-backed, or legacy usage records when `legacy`)."""
    options: Any = {"stripe_version": LEGACY} if legacy else {}
    params: Any = {"email": "ada@example.com"}
    if test_clock:
        params["test_clock"] = test_clock
    customer = client.v1.customers.create(params)
    meter = None if legacy else make_meter(client, event_name)
    recurring: dict[str, Any] = {"interval": "month", "usage_type": "metered"}
    if meter:
        recurring["meter"] = meter
    price_params: Any = {
        "currency": "usd",
        "product_data": {"name": "Standard"},
        "recurring": recurring,
        "billing_scheme": "tiered",
        "tiers_mode": tiers_mode,
        "tiers": tiers or STANDARD_TIERS,
    }
    price = client.v1.prices.create(price_params, options)
    items: list[Any] = [{"price": price.id}]
    if extra_licensed:
        base = client.v1.prices.create(
            {
                "currency": "usd",
                "product_data": {"name": "Base"},
                "unit_amount": 500,
                "recurring": {"interval": "month"},
            }
        )
        items.append({"price": base.id, "quantity": 1})
    sub_params: Any = {"customer": customer.id, "items": items}
    sub = client.v1.subscriptions.create(sub_params, options)
    item = sub["items"].data[0]
    return Metered(
        customer.id,
        sub.id,
        item.id,
        price.id,
        meter,
        item["current_period_start"],
        item["current_period_end"],
    )
