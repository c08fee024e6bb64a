"""Invoice amounts for tiered prices, test clocks and billing period rollover."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from metered_middleware.testing.emulator import StripeEmulator

from ._helpers import LEGACY, Metered, subscribe

ENTERPRISE_TIERS: list[dict[str, Any]] = [
    {"up_to": 100000, "flat_amount": 7500, "unit_amount": 0},
    {"up_to": "inf", "unit_amount_decimal": "0.75"},
]
VOLUME_TIERS: list[dict[str, Any]] = [
    {"up_to": 100, "unit_amount": 5},
    {"up_to": "inf", "unit_amount": 3, "flat_amount": 100},
]


def _report(client: stripe.StripeClient, m: Metered, value: int, timestamp: int | None = None) -> None:
    params: Any = {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": m.customer, "value": str(value)},
    }
    if timestamp is not None:
        params["timestamp"] = timestamp
    client.v1.billing.meter_events.create(params)


@pytest.mark.parametrize(("usage", "amount"), [(0, 1000), (10000, 1000), (10001, 1010), (12345, 24450)])
def test_standard_plan_graduated_tiers(stripe_client: stripe.StripeClient, usage: int, amount: int) -> None:
    """Standard ($10 for the first 10,000, then $0.10 each) prices 12,345 requests at 24,450 cents."""
    m = subscribe(stripe_client)
    if usage:
        _report(stripe_client, m, usage)
    preview = stripe_client.v1.invoices.create_preview({"subscription": m.subscription})
    assert preview.amount_due == amount
    assert preview.lines.data[0].quantity == usage
    assert preview.period_start == m.period_start


@pytest.mark.parametrize(("usage", "amount"), [(100000, 7500), (100001, 7501), (100004, 7503)])
def test_enterprise_plan_decimal_unit_amounts(
    stripe_client: stripe.StripeClient, usage: int, amount: int
) -> None:
    """Enterprise ($75 flat, then 0.75 cents a request) rounds the total half up to a cent."""
    m = subscribe(stripe_client, tiers=ENTERPRISE_TIERS)
    _report(stripe_client, m, usage)
    assert stripe_client.v1.invoices.create_preview({"subscription": m.subscription}).amount_due == amount


@pytest.mark.parametrize(("usage", "amount"), [(100, 500), (101, 403), (150, 550)])
def test_volume_tiers_price_every_unit_at_one_rate(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient, usage: int, amount: int
) -> None:
    """Volume tiers charge all units at the tier the total falls in, plus that tier's flat fee."""
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": stripe_emulator.now()})
    m = subscribe(stripe_client, tiers=VOLUME_TIERS, test_clock=clock.id, tiers_mode="volume")
    _report(stripe_client, m, usage)
    assert stripe_client.v1.invoices.create_preview({"customer": m.customer}).amount_due == amount


def test_growth_plan_flat_fee_is_billed_in_advance(stripe_client: stripe.StripeClient) -> None:
    """A licensed $25 price appears on the preview for the next period, like Stripe's upcoming invoice."""
    growth = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "product_data": {"name": "Growth"},
            "unit_amount": 2500,
            "recurring": {"interval": "month"},
        }
    )
    customer = stripe_client.v1.customers.create({})
    sub = stripe_client.v1.subscriptions.create({"customer": customer.id, "items": [{"price": growth.id}]})
    preview = stripe_client.v1.invoices.create_preview({"subscription": sub.id})
    assert preview.amount_due == 2500
    assert preview.lines.data[0].period.start == sub["current_period_end"]


def test_preview_with_legacy_usage_records(stripe_client: stripe.StripeClient) -> None:
    """Usage records feed the preview the same way meter events do."""
    m = subscribe(stripe_client, legacy=True)
    stripe_client.raw_request(
        "post", f"/v1/subscription_items/{m.item}/usage_records", quantity=12345, stripe_version=LEGACY
    )
    preview = stripe_client.v1.invoices.create_preview({"subscription": m.subscription})
    assert preview.amount_due == 24450


def test_preview_needs_customer_or_subscription(stripe_client: stripe.StripeClient) -> None:
    """A preview without a customer or subscription is a parameter_missing error."""
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.invoices.create_preview()
    assert caught.value.code == "parameter_missing"


@pytest.mark.anyio
async def test_preview_async(stripe_emulator: StripeEmulator) -> None:
    """`create_preview_async` prices the same vector."""
    client = stripe_emulator.client()
    m = subscribe(client)
    _report(client, m, 12345)
    preview = await client.v1.invoices.create_preview_async({"subscription": m.subscription})
    assert preview.amount_due == 24450


# -- test clocks and rollover ---------------------------------------------------------------------


def test_test_clock_create_retrieve_advance(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """A clock advances forward only; the advance answers "advancing" and then reads "ready"."""
    start = stripe_emulator.now()
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": start, "name": "t"})
    advanced = stripe_client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": start + 3600})
    assert advanced.status == "advancing"
    fetched = stripe_client.v1.test_helpers.test_clocks.retrieve(clock.id)
    assert fetched.status == "ready"
    assert fetched.frozen_time == start + 3600
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": start})
    assert caught.value.param == "frozen_time"


def test_advance_past_period_end_rolls_and_finalizes_invoice(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Advancing past the period end starts a new period and finalizes the closed one's invoice."""
    start = stripe_emulator.now()
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": start})
    m = subscribe(stripe_client, test_clock=clock.id)
    _report(stripe_client, m, 12345, timestamp=start + 10)
    stripe_client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": start + 86400})
    _report(stripe_client, m, 5, timestamp=start + 86400)
    stripe_client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": m.period_end + 60})
    sub = stripe_client.v1.subscriptions.retrieve(m.subscription)
    assert sub["current_period_start"] == m.period_end
    item = stripe_client.v1.subscription_items.retrieve(m.item)
    assert item["current_period_start"] == m.period_end
    invoices = stripe_client.v1.invoices.list({"subscription": m.subscription}).data
    cycle = [i for i in invoices if i.billing_reason == "subscription_cycle"]
    assert len(cycle) == 1
    assert cycle[0].amount_due == 24500
    assert cycle[0].status == "open"
    assert (cycle[0].period_start, cycle[0].period_end) == (m.period_start, m.period_end)
    assert stripe_client.v1.invoices.create_preview({"subscription": m.subscription}).amount_due == 1000
    assert [e["type"] for e in stripe_emulator.events("invoice.finalized")] == ["invoice.finalized"] * 2


def test_advance_two_periods_finalizes_two_invoices(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Each closed period gets its own invoice when the clock jumps over several."""
    start = stripe_emulator.now()
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": start})
    m = subscribe(stripe_client, test_clock=clock.id)
    stripe_client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": start + 62 * 86400})
    cycles = stripe_emulator.invoices(m.subscription)[1:]
    assert len(cycles) == 2
    assert cycles[0]["period_end"] == cycles[1]["period_start"]


def test_usage_records_follow_rollover(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """After a rollover, old-period timestamps are refused and summaries list both periods."""
    start = stripe_emulator.now()
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": start})
    m = subscribe(stripe_client, legacy=True, test_clock=clock.id)
    path = f"/v1/subscription_items/{m.item}/usage_records"
    stripe_client.raw_request("post", path, quantity=30, timestamp=start, stripe_version=LEGACY)
    stripe_client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": m.period_end + 5})
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.raw_request("post", path, quantity=1, timestamp=start, stripe_version=LEGACY)
    assert caught.value.param == "timestamp"
    stripe_client.raw_request("post", path, quantity=2, stripe_version=LEGACY)
    raw = stripe_client.raw_request(
        "get", f"/v1/subscription_items/{m.item}/usage_record_summaries", stripe_version=LEGACY
    )
    summaries = stripe_client.deserialize(raw, api_mode="V1")["data"]
    assert [s["total_usage"] for s in summaries] == [2, 30]
    assert summaries[1]["invoice"] is not None
    assert stripe_emulator.usage_record_total(m.item, period_start=m.period_start) == 30
    assert stripe_emulator.usage_record_total(m.item) == 32


def test_emulated_clock_rolls_subscriptions_without_test_clock(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Moving the emulator's own clock past the period end rolls ordinary subscriptions too."""
    m = subscribe(stripe_client)
    stripe_emulator.advance_clock(m.period_end - stripe_emulator.now() + 1)
    sub = stripe_client.v1.subscriptions.retrieve(m.subscription)
    assert sub["current_period_start"] == m.period_end
    assert len(stripe_client.v1.invoices.list({"subscription": m.subscription}).data) == 2


def test_cancel_at_period_end_ends_subscription_on_rollover(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """`cancel_at_period_end` cancels at the boundary, after invoicing the last period."""
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": stripe_emulator.now()})
    m = subscribe(stripe_client, test_clock=clock.id)
    stripe_client.v1.subscriptions.update(m.subscription, {"cancel_at_period_end": True})
    stripe_client.v1.test_helpers.test_clocks.advance(clock.id, {"frozen_time": m.period_end})
    sub = stripe_client.v1.subscriptions.retrieve(m.subscription)
    assert sub.status == "canceled"
    assert sub.ended_at == m.period_end
    assert stripe_emulator.events("customer.subscription.deleted")
