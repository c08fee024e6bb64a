"""The guide's "test your integration", end to end on the emulator: sign up, call, flush, invoice.

The app runs under a real uvicorn server (Checkout's webhooks and the success page go over TCP); the bulk
of the calls go through the same app in-process, concurrently, so 12,345 real metered calls stay quick.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import httpx
import pytest

from examples.typographic.app import Typographic
from examples.typographic.billing import create_checkout_session
from examples.typographic.plans import ENTERPRISE, GROWTH, METER_EVENT_NAME, STANDARD, Plan
from tests.examples.conftest import WEBHOOK_SECRET, World, api, serving

pytestmark = pytest.mark.anyio

# Operators weigh expensive routes; here the CSS route weighs 100 so Growth and Enterprise cross their
# 10,000 included requests in a few hundred calls (Standard's 12,345 units are 12,345 single calls).
WEIGHTS = {"METERED_ROUTE_WEIGHTS": "GET /v1/css=100"}


@dataclass(frozen=True)
class Customer:
    """A customer signed up through Checkout, with the key the success page showed."""

    plan: Plan
    customer: str
    subscription: str
    item: str
    key: str


async def _sign_up(world: World, base: str, plan: Plan, clock: str) -> Customer:
    """Checkout as a customer on the test clock, then read the key from the success page over TCP."""
    session = await create_checkout_session(
        world.client,
        plan,
        world.setup.price_for(plan, legacy=world.legacy),
        success_url=f"{base}/success?session_id={{CHECKOUT_SESSION_ID}}",
        cancel_url=f"{base}/",
        legacy=world.legacy,
    )
    complete = functools.partial(world.emulator.complete_checkout, session.id, test_clock=clock)
    ids = await anyio.to_thread.run_sync(complete)
    async with httpx.AsyncClient(base_url=base) as http:
        page = await http.get(
            "/success", params={"session_id": session.id}, headers={"Accept": "application/json"}
        )
    return Customer(
        plan, ids["customer"], ids["subscription"], ids["subscription_item"], page.json()["api_key"]
    )


async def _call(app: Typographic, key: str, paths: Sequence[tuple[str, int]], workers: int = 16) -> None:
    """Make every (path, times) call concurrently; each must succeed."""
    todo = [path for path, times in paths for _ in range(times)]

    async def worker(http: httpx.AsyncClient, share: list[str]) -> None:
        for path in share:
            response = await http.get(path)
            assert response.status_code == 200, response.text

    async with api(app, key) as http, anyio.create_task_group() as tg:
        for index in range(workers):
            tg.start_soon(worker, http, todo[index::workers])


def _assert_billed_through_sink(world: World, expected: dict[Customer, int]) -> None:
    """The counted units reached Stripe through the world's sink, and only through it."""
    for customer, units in expected.items():
        metered = world.emulator.meter_event_total(customer.customer, METER_EVENT_NAME)
        recorded = world.emulator.usage_record_total(customer.item)
        assert (metered, recorded) == ((0, units) if world.legacy else (units, 0))
    v1 = world.emulator.requests("meter_events.create")
    stream = world.emulator.requests("meter_event_stream.create")
    records = world.emulator.requests("usage_records.create")
    used = {"meter_events": v1, "meter_event_stream": stream, "usage_records": records}
    assert {name for name, made in used.items() if made} == {world.sink}


@pytest.mark.parametrize("sink", ["meter_events", "usage_records", "meter_event_stream"])
async def test_metered_calls_become_exact_invoices(world: World) -> None:
    """12,345 Standard calls invoice at exactly $244.50; Growth and Enterprise match the estimator.

    Once per sink: v1 meter events, legacy usage records on legacy metered prices, and the v2 stream.
    """
    app = world.app(WEIGHTS, deliver=True)
    async with serving(app) as base:
        world.emulator.set_webhook(f"{base}/stripe/webhook", WEBHOOK_SECRET)
        start = world.emulator.now()
        clock = await world.client.v1.test_helpers.test_clocks.create_async({"frozen_time": start})
        standard, growth, enterprise = [
            await _sign_up(world, base, p, clock.id) for p in (STANDARD, GROWTH, ENTERPRISE)
        ]

        await _call(app, standard.key, [("/v1/fonts", 12_345)])
        # 10,050 units: 100 CSS calls at 100, 45 plain calls and one 5-unit subset.
        await _call(
            app,
            growth.key,
            [("/v1/css?family=lato", 100), ("/v1/fonts", 45), ("/v1/fonts/lato/subset?text=Hi", 1)],
        )
        # 10,001 units: Enterprise's 7,500.75 cents round half up to 7,501.
        await _call(app, enterprise.key, [("/v1/css?family=caladea", 100), ("/v1/fonts/caladea", 1)])
        expected = {standard: 12_345, growth: 10_050, enterprise: 10_001}

        await app.flush()  # counts to Redis, then every pending line to Stripe
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {standard.key}"}
        ) as http:
            usage = (await http.get("/v1/usage")).json()
        assert usage["requests"] == {"counted": 12_345, "delivered": 12_345, "pending": 0, "failed": 0}
        assert usage["estimate"]["amount"] == 24_450
        _assert_billed_through_sink(world, expected)

        period_end = (await world.client.v1.subscriptions.retrieve_async(standard.subscription))[
            "items"
        ].data[0]["current_period_end"]
        await world.client.v1.test_helpers.test_clocks.advance_async(
            clock.id, {"frozen_time": period_end + 3600}
        )
        await anyio.to_thread.run_sync(world.emulator.wait_webhooks)

        for customer, units in expected.items():
            invoices = await world.client.v1.invoices.list_async({"subscription": customer.subscription})
            (cycle,) = [i for i in invoices.data if i.billing_reason == "subscription_cycle"]
            assert cycle.amount_due == customer.plan.estimate_cents(units)
            details = [line.pricing and line.pricing.price_details for line in cycle.lines.data]
            assert {d.price for d in details if d} == {
                world.setup.price_for(customer.plan, legacy=world.legacy)
            }
        assert [c.plan.estimate_cents(u) for c, u in expected.items()] == [24_450, 3_000, 7_501]

        # The new period reached the keys through customer.subscription.updated: usage starts again at 0.
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {standard.key}"}
        ) as http:
            fresh = (await http.get("/v1/usage")).json()
        assert fresh["period"]["start"] == period_end
        assert fresh["requests"]["counted"] == 0

        # A revoked key and a canceled subscription are refused.
        await app.registry.revoke(growth.key)
        app.metered.resolver.invalidate()  # this process forgets it now; others after the cache TTL
        await world.client.v1.subscriptions.cancel_async(enterprise.subscription)
        await anyio.to_thread.run_sync(world.emulator.wait_webhooks)
        async with api(app, growth.key) as http:
            revoked = await http.get("/v1/fonts")
        async with api(app, enterprise.key) as http:
            canceled = await http.get("/v1/fonts")
        assert (revoked.status_code, revoked.json()["error"]["code"]) == (401, "api_key_revoked")
        assert (canceled.status_code, canceled.json()["error"]["code"]) == (402, "subscription_inactive")
