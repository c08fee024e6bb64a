"""Checkout Sessions, the completion helper, and signed webhooks that the SDK verifies."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
import stripe

from metered_middleware.testing.emulator import EmulatorError, StripeEmulator

from ._helpers import make_meter

SECRET = "whsec_test_emulator_secret"


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[bytes, str]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((body, self.headers.get("Stripe-Signature", "")))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


@pytest.fixture
def webhook_endpoint(stripe_emulator: StripeEmulator) -> Iterator[list[tuple[bytes, str]]]:
    """A local endpoint collecting (payload, Stripe-Signature) pairs, wired into the emulator."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    received: list[tuple[bytes, str]] = []
    server.received = received  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stripe_emulator.set_webhook(f"http://127.0.0.1:{server.server_address[1]}/webhooks", SECRET)
    try:
        yield received
    finally:
        stripe_emulator.set_webhook(None, None)
        server.shutdown()
        server.server_close()
        thread.join()


def _session(client: stripe.StripeClient, **extra: Any) -> Any:
    meter = make_meter(client)
    price = client.v1.prices.create(
        {
            "currency": "usd",
            "product_data": {"name": "Standard"},
            "unit_amount": 10,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
        }
    )
    params: Any = {
        "mode": "subscription",
        "line_items": [{"price": price.id}],
        "success_url": "https://example.com/ok",
        "customer_email": "buyer@example.com",
        **extra,
    }
    return client.v1.checkout.sessions.create(params)


def test_checkout_session_is_open_with_url(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """A subscription-mode session starts open with a URL on the emulator."""
    session = _session(stripe_client)
    assert session.id.startswith("cs_test_")
    assert session.status == "open"
    assert session.url.startswith(stripe_emulator.url)


def test_checkout_validates_mode_and_line_items(stripe_client: stripe.StripeClient) -> None:
    """Missing line items in subscription mode and unknown parameters are refused."""
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.checkout.sessions.create({"mode": "subscription"})
    assert caught.value.param == "line_items"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.checkout.sessions.create(cast(Any, {"mode": "subscription", "shoe_size": 9}))
    assert caught.value.code == "parameter_unknown"


def test_complete_checkout_creates_customer_and_subscription(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Completing a session creates the customer and subscription and marks the session complete."""
    session = _session(stripe_client, client_reference_id="acct_42")
    result = stripe_emulator.complete_checkout(session.id)
    customer = stripe_client.v1.customers.retrieve(result["customer"])
    assert customer.email == "buyer@example.com"
    sub = stripe_client.v1.subscriptions.retrieve(result["subscription"])
    assert sub.status == "active"
    assert sub["items"].data[0].id == result["subscription_item"]
    done = stripe_client.v1.checkout.sessions.retrieve(session.id)
    assert (done.status, done.subscription, done.customer) == ("complete", sub.id, customer.id)
    with pytest.raises(EmulatorError, match="not open"):
        stripe_emulator.complete_checkout(session.id)


def test_complete_checkout_on_test_clock(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """With `test_clock`, the new customer and its periods follow the clock."""
    frozen = stripe_emulator.now() - 7 * 86400
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": frozen})
    result = stripe_emulator.complete_checkout(_session(stripe_client).id, test_clock=clock.id)
    assert stripe_client.v1.customers.retrieve(result["customer"]).test_clock == clock.id
    assert stripe_client.v1.subscriptions.retrieve(result["subscription"])["current_period_start"] == frozen


def test_complete_checkout_of_a_legacy_metered_price(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """A session created on a pre-2025-03-31 version with a legacy metered price completes, and its item takes
    usage records."""
    legacy = "2025-02-24.acacia"
    price = stripe_client.raw_request(
        "post",
        "/v1/prices",
        currency="usd",
        product_data={"name": "Legacy"},
        unit_amount=10,
        recurring={"interval": "month", "usage_type": "metered", "aggregate_usage": "sum"},
        stripe_version=legacy,
    )
    price_id = stripe_client.deserialize(price, api_mode="V1")["id"]
    session = stripe_client.raw_request(
        "post",
        "/v1/checkout/sessions",
        mode="subscription",
        line_items=[{"price": price_id}],
        success_url="https://example.com/ok",
        customer_email="legacy@example.com",
        stripe_version=legacy,
    )
    result = stripe_emulator.complete_checkout(stripe_client.deserialize(session, api_mode="V1")["id"])
    stripe_client.raw_request(
        "post",
        f"/v1/subscription_items/{result['subscription_item']}/usage_records",
        quantity=7,
        stripe_version=legacy,
    )
    assert stripe_emulator.usage_record_total(result["subscription_item"]) == 7


def test_webhooks_are_signed_and_verifiable(
    stripe_emulator: StripeEmulator,
    stripe_client: stripe.StripeClient,
    webhook_endpoint: list[tuple[bytes, str]],
) -> None:
    """Checkout completion sends signed events that `stripe.Webhook.construct_event` accepts."""
    session = _session(stripe_client)
    result = stripe_emulator.complete_checkout(session.id)
    events = [stripe.Webhook.construct_event(body.decode(), sig, SECRET) for body, sig in webhook_endpoint]
    types = [e.type for e in events]
    assert "customer.subscription.created" in types
    assert types.index("customer.subscription.created") < types.index("checkout.session.completed")
    completed = events[types.index("checkout.session.completed")]
    assert completed.data.object["subscription"] == result["subscription"]
    assert all(d.status == 200 for d in stripe_emulator.webhook_deliveries())


def test_webhook_signature_rejects_other_secret(
    stripe_emulator: StripeEmulator,
    stripe_client: stripe.StripeClient,
    webhook_endpoint: list[tuple[bytes, str]],
) -> None:
    """The signature is a real HMAC: another secret fails verification."""
    stripe_emulator.complete_checkout(_session(stripe_client).id)
    body, signature = webhook_endpoint[0]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode(), signature, "whsec_wrong")


def test_subscription_update_and_cancel_send_webhooks(
    stripe_emulator: StripeEmulator,
    stripe_client: stripe.StripeClient,
    webhook_endpoint: list[tuple[bytes, str]],
) -> None:
    """Updating and canceling a subscription send `.updated` and `.deleted` events."""
    result = stripe_emulator.complete_checkout(_session(stripe_client).id)
    stripe_client.v1.subscriptions.update(result["subscription"], {"metadata": {"plan": "standard"}})
    stripe_client.v1.subscriptions.cancel(result["subscription"])
    assert stripe_emulator.wait_webhooks()
    events = [json.loads(body) for body, _ in webhook_endpoint]
    updated = [e for e in events if e["type"] == "customer.subscription.updated"]
    deleted = [e for e in events if e["type"] == "customer.subscription.deleted"]
    assert updated[0]["data"]["object"]["metadata"] == {"plan": "standard"}
    assert deleted[0]["data"]["object"]["status"] == "canceled"


@pytest.mark.anyio
async def test_checkout_async(stripe_emulator: StripeEmulator) -> None:
    """Checkout Sessions can be created and retrieved with the async client."""
    client = stripe_emulator.client()
    price = await client.v1.prices.create_async(
        {
            "currency": "usd",
            "product_data": {"name": "Growth"},
            "unit_amount": 2500,
            "recurring": {"interval": "month"},
        }
    )
    session = await client.v1.checkout.sessions.create_async(
        {"mode": "subscription", "line_items": [{"price": price.id, "quantity": 1}]}
    )
    stripe_emulator.complete_checkout(session.id)
    fetched = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert fetched.status == "complete"


def test_checkout_expire_and_list(stripe_client: stripe.StripeClient) -> None:
    """Open sessions can be expired once and are listed."""
    session = _session(stripe_client)
    assert stripe_client.v1.checkout.sessions.expire(session.id).status == "expired"
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.checkout.sessions.expire(session.id)
    assert [s.id for s in stripe_client.v1.checkout.sessions.list().data] == [session.id]


def test_finalized_invoice_retrieve(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Invoices finalized by the emulator can be retrieved by id."""
    result = stripe_emulator.complete_checkout(_session(stripe_client).id)
    invoice_id = stripe_emulator.invoices(result["subscription"])[0]["id"]
    invoice = stripe_client.v1.invoices.retrieve(invoice_id)
    assert invoice.billing_reason == "subscription_create"
    assert invoice.customer == result["customer"]
