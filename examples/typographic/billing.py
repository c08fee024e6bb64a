"""Stripe objects for the example: the meter, three products with tiered prices, and Checkout sessions.

``setup_stripe`` is idempotent: products have fixed ids, prices are found by lookup key, the meter by its
event name, so running it twice (or against an account set up before) creates nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import stripe

from examples.typographic.plans import METER_EVENT_NAME, PLANS, Plan

__all__ = ["LEGACY_API_VERSION", "StripeSetup", "create_checkout_session", "setup_stripe"]

# Usage records and meterless metered prices exist only for API versions before 2025-03-31.
LEGACY_API_VERSION: Final = "2025-02-24.acacia"


@dataclass(frozen=True, slots=True)
class StripeSetup:
    """What ``setup_stripe`` found or created: the meter and each plan's price id (by plan key)."""

    meter: str
    prices: dict[str, str] = field(default_factory=dict)
    legacy_prices: dict[str, str] = field(default_factory=dict)
    created: tuple[str, ...] = ()

    def price_for(self, plan: Plan, *, legacy: bool = False) -> str:
        """The price a plan's Checkout session subscribes to."""
        return (self.legacy_prices if legacy else self.prices)[plan.key]


async def _meter(client: stripe.StripeClient, created: list[str]) -> str:
    # An account has a handful of meters; one page of 100 active ones covers it.
    listed = await client.v1.billing.meters.list_async({"status": "active", "limit": 100})
    for meter in listed.data:
        if meter.event_name == METER_EVENT_NAME:
            return str(meter.id)
    meter = await client.v1.billing.meters.create_async(
        {
            "display_name": "Typographic API requests",
            "event_name": METER_EVENT_NAME,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    created.append(meter.id)
    return meter.id


async def _product(client: stripe.StripeClient, plan: Plan, created: list[str]) -> str:
    product_id = f"typographic_{plan.key}"
    try:
        return (await client.v1.products.retrieve_async(product_id)).id
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise
    product = await client.v1.products.create_async(
        {
            "id": product_id,
            "name": f"Typographic {plan.name}",
            "description": plan.description,
            "metadata": {"typographic_plan": plan.key},
        }
    )
    created.append(product.id)
    return product.id


async def _price(
    client: stripe.StripeClient,
    plan: Plan,
    product: str,
    created: list[str],
    *,
    meter: str | None,
) -> str:
    lookup_key = plan.legacy_lookup_key if meter is None else plan.lookup_key
    options: stripe.RequestOptions = {}
    if meter is None:
        options["stripe_version"] = LEGACY_API_VERSION
    found = await client.v1.prices.list_async(
        {"lookup_keys": [lookup_key], "active": True, "limit": 1}, options
    )
    if found.data:
        return found.data[0].id
    recurring: dict[str, Any] = {"interval": "month", "usage_type": "metered"}
    if meter is None:
        recurring["aggregate_usage"] = "sum"
    else:
        recurring["meter"] = meter
    params: dict[str, Any] = {
        "product": product,
        "currency": "usd",
        "nickname": f"{plan.name} monthly" + (" (usage records)" if meter is None else ""),
        "lookup_key": lookup_key,
        "billing_scheme": "tiered",
        "tiers_mode": "graduated",
        "tiers": [tier.to_stripe() for tier in plan.tiers],
        "recurring": recurring,
        "metadata": {"typographic_plan": plan.key},
    }
    price = await client.v1.prices.create_async(params, options)  # type: ignore[arg-type]
    created.append(price.id)
    return price.id


async def setup_stripe(client: stripe.StripeClient, *, legacy: bool = False) -> StripeSetup:
    """Find or create the meter, the three products and their monthly graduated prices.

    With ``legacy`` the meterless metered prices billed through usage records are set up as well.
    """
    created: list[str] = []
    meter = await _meter(client, created)
    prices: dict[str, str] = {}
    legacy_prices: dict[str, str] = {}
    for plan in PLANS:
        product = await _product(client, plan, created)
        prices[plan.key] = await _price(client, plan, product, created, meter=meter)
        if legacy:
            legacy_prices[plan.key] = await _price(client, plan, product, created, meter=None)
    return StripeSetup(meter, prices, legacy_prices, tuple(created))


async def create_checkout_session(
    client: stripe.StripeClient,
    plan: Plan,
    price: str,
    *,
    success_url: str,
    cancel_url: str,
    legacy: bool = False,
) -> stripe.checkout.Session:
    """A subscription-mode Checkout session for a plan; the plan rides along in the metadata.

    ``legacy`` prices (billed through usage records) can only be subscribed to on an API version before
    2025-03-31, so the session is created on that version.
    """
    options: stripe.RequestOptions = {"stripe_version": LEGACY_API_VERSION} if legacy else {}
    return await client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "line_items": [{"price": price}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": {"typographic_plan": plan.key},
            "subscription_data": {"metadata": {"typographic_plan": plan.key}},
        },
        options,
    )
