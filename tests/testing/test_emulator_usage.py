"""Usage records (legacy), meter events v1 and v2, adjustments and summaries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

import pytest
import stripe

from metered_middleware.testing.emulator import StripeEmulator

from ._helpers import LEGACY, subscribe

OLD: Any = {"stripe_version": LEGACY}


def _usage(client: stripe.StripeClient, item: str, **params: Any) -> Any:
    return client.raw_request(
        "post", f"/v1/subscription_items/{item}/usage_records", stripe_version=LEGACY, **params
    )


# -- usage records --------------------------------------------------------------------------------


def test_usage_records_accumulate_on_legacy_version(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Usage records with a pre-basil Stripe-Version add up (increment) or overwrite (set)."""
    m = subscribe(stripe_client, legacy=True)
    _usage(stripe_client, m.item, quantity=5, timestamp=m.period_start)
    response = _usage(stripe_client, m.item, quantity=7, timestamp=m.period_start)
    assert stripe_client.deserialize(response, api_mode="V1")["object"] == "usage_record"
    assert stripe_emulator.usage_record_total(m.item) == 12
    _usage(stripe_client, m.item, quantity=1, timestamp=m.period_start, action="set")
    _usage(stripe_client, m.item, quantity=3, timestamp="now", action="increment")
    assert stripe_emulator.usage_record_total(m.item) == 4
    assert stripe_emulator.usage_record_total(m.item, period_start=m.period_start) == 4


def test_usage_records_refused_on_current_version(stripe_client: stripe.StripeClient) -> None:
    """Since 2025-03-31.basil the usage records endpoint does not exist: Stripe's 404."""
    m = subscribe(stripe_client, legacy=True)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.raw_request("post", f"/v1/subscription_items/{m.item}/usage_records", quantity=1)
    assert caught.value.http_status == 404
    assert "Unrecognized request URL" in str(caught.value.user_message)


@pytest.mark.parametrize("offset", [-1, 10**6])
def test_usage_record_timestamp_outside_period_or_future(
    stripe_client: stripe.StripeClient, offset: int
) -> None:
    """A timestamp before the current period or in the future is a 400 on `timestamp`."""
    m = subscribe(stripe_client, legacy=True)
    ts = m.period_start + offset
    with pytest.raises(stripe.InvalidRequestError) as caught:
        _usage(stripe_client, m.item, quantity=1, timestamp=ts)
    assert caught.value.http_status == 400
    assert caught.value.param == "timestamp"


def test_usage_record_quantity_must_be_integer(stripe_client: stripe.StripeClient) -> None:
    """An ill-typed quantity gets `parameter_invalid_integer`."""
    m = subscribe(stripe_client, legacy=True)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        _usage(stripe_client, m.item, quantity="lots")
    assert caught.value.code == "parameter_invalid_integer"


def test_usage_records_refused_after_item_deleted(stripe_client: stripe.StripeClient) -> None:
    """Once its item is deleted, usage for it is Stripe's 404 resource_missing."""
    m = subscribe(stripe_client, legacy=True, extra_licensed=True)
    stripe_client.v1.subscription_items.delete(m.item, options=OLD)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        _usage(stripe_client, m.item, quantity=1)
    assert caught.value.http_status == 404
    assert caught.value.code == "resource_missing"


def test_usage_record_summaries(stripe_client: stripe.StripeClient) -> None:
    """Summaries report the current period's total usage for the item."""
    m = subscribe(stripe_client, legacy=True)
    _usage(stripe_client, m.item, quantity=40, timestamp=m.period_start)
    _usage(stripe_client, m.item, quantity=2)
    raw = stripe_client.raw_request(
        "get", f"/v1/subscription_items/{m.item}/usage_record_summaries", stripe_version=LEGACY
    )
    summaries = stripe_client.deserialize(raw, api_mode="V1")
    assert summaries["data"][0]["total_usage"] == 42
    assert summaries["data"][0]["period"]["start"] == m.period_start


@pytest.mark.anyio
async def test_usage_records_async_raw_request(
    stripe_emulator: StripeEmulator,
) -> None:
    """`raw_request_async` reaches the legacy endpoint as well."""
    client = stripe_emulator.client()
    m = subscribe(client, legacy=True)
    await client.raw_request_async(
        "post",
        f"/v1/subscription_items/{m.item}/usage_records",
        quantity=9,
        stripe_version=LEGACY,
    )
    assert stripe_emulator.usage_record_total(m.item) == 9


# -- meter events v1 ------------------------------------------------------------------------------


def _event(client: stripe.StripeClient, customer: str, value: int, **extra: Any) -> Any:
    params: Any = {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": customer, "value": str(value)},
        **extra,
    }
    return client.v1.billing.meter_events.create(params)


def test_meter_events_are_summed_per_customer(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Accepted meter event values add up per customer and event name."""
    m = subscribe(stripe_client)
    _event(stripe_client, m.customer, 3, identifier="a")
    _event(stripe_client, m.customer, 4)
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 7
    assert stripe_emulator.meter_events(m.customer)[0]["identifier"] == "a"


def test_duplicate_identifier_is_refused_without_retry(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """A repeated identifier within 24 h is a 400 with Stripe-Should-Retry: false, not a second event."""
    m = subscribe(stripe_client)
    _event(stripe_client, m.customer, 5, identifier="batch-1")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        _event(stripe_client, m.customer, 5, identifier="batch-1")
    error = caught.value
    assert error.http_status == 400
    assert error.code == "duplicate_meter_event"
    assert "already exists with identifier batch-1" in str(error.user_message)
    assert error.headers is not None
    assert error.headers["Stripe-Should-Retry"] == "false"
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 5


def test_identifier_is_reusable_after_24_hours(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Uniqueness lasts 24 h of emulated time; after that the identifier is new again."""
    m = subscribe(stripe_client)
    _event(stripe_client, m.customer, 1, identifier="old")
    stripe_emulator.advance_clock(24 * 3600 + 1)
    _event(stripe_client, m.customer, 1, identifier="old")
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 2


@pytest.mark.parametrize(
    ("offset", "code"), [(-36 * 86400, "timestamp_too_far_in_past"), (301, "timestamp_in_future")]
)
def test_meter_event_timestamp_window(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient, offset: int, code: str
) -> None:
    """Timestamps more than 35 days back or 5 minutes ahead are refused on `timestamp`."""
    m = subscribe(stripe_client)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        _event(stripe_client, m.customer, 1, timestamp=stripe_emulator.now() + offset)
    assert caught.value.param == "timestamp"
    assert caught.value.code == code


def test_meter_event_window_follows_test_clock(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """For a customer on a test clock, the window is measured from the clock's frozen time."""
    frozen = stripe_emulator.now() - 60 * 86400
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": frozen})
    m = subscribe(stripe_client, test_clock=clock.id)
    _event(stripe_client, m.customer, 2, timestamp=frozen - 86400)
    with pytest.raises(stripe.InvalidRequestError):
        _event(stripe_client, m.customer, 2, timestamp=stripe_emulator.now())
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 2


def test_meter_event_unknown_customer_and_inactive_meter(stripe_client: stripe.StripeClient) -> None:
    """Events for an unknown customer or an inactive meter are refused."""
    m = subscribe(stripe_client)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        _event(stripe_client, "cus_missing", 1)
    assert caught.value.code == "meter_event_customer_not_found"
    assert m.meter is not None
    stripe_client.v1.billing.meters.deactivate(m.meter)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        _event(stripe_client, m.customer, 1)
    assert caught.value.code == "archived_meter"


def test_meter_event_adjustment_cancels_event(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """A cancel adjustment removes the event from totals."""
    m = subscribe(stripe_client)
    _event(stripe_client, m.customer, 10, identifier="keep")
    _event(stripe_client, m.customer, 5, identifier="drop")
    adjustment = stripe_client.v1.billing.meter_event_adjustments.create(
        {"event_name": "api_requests", "type": "cancel", "cancel": {"identifier": "drop"}}
    )
    assert adjustment.status == "pending"
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 10


def test_meter_event_summaries(stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient) -> None:
    """Event summaries aggregate a customer's events over [start_time, end_time)."""
    m = subscribe(stripe_client)
    now = stripe_emulator.now()
    _event(stripe_client, m.customer, 6, timestamp=now - 7200)
    _event(stripe_client, m.customer, 4, timestamp=now - 60)
    assert m.meter is not None
    whole = stripe_client.v1.billing.meters.event_summaries.list(
        m.meter, {"customer": m.customer, "start_time": now - 86400, "end_time": now + 60}
    )
    assert [s.aggregated_value for s in whole.data] == [10]
    recent = stripe_client.v1.billing.meters.event_summaries.list(
        m.meter, {"customer": m.customer, "start_time": now - 3600, "end_time": now + 60}
    )
    assert recent.data[0].aggregated_value == 4


@pytest.mark.anyio
async def test_meter_events_async(stripe_emulator: StripeEmulator) -> None:
    """`meter_events.create_async` records events like the sync call."""
    client = stripe_emulator.client()
    m = subscribe(client)
    await client.v1.billing.meter_events.create_async(
        {"event_name": "api_requests", "payload": {"stripe_customer_id": m.customer, "value": "8"}}
    )
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 8


# -- meter event stream v2 ------------------------------------------------------------------------


def _stream_client(emu: StripeEmulator, client: stripe.StripeClient) -> stripe.StripeClient:
    session = client.v2.billing.meter_event_session.create()
    return emu.client(api_key=session.authentication_token)


def _events(customer: str, n: int, prefix: str = "e") -> Any:
    return [
        {
            "event_name": "api_requests",
            "identifier": f"{prefix}{i}",
            "payload": {"stripe_customer_id": customer, "value": "1"},
        }
        for i in range(n)
    ]


def test_meter_event_session_expires_in_15_minutes(stripe_client: stripe.StripeClient) -> None:
    """A session token comes with an expiry 15 minutes after creation."""
    session = stripe_client.v2.billing.meter_event_session.create()
    assert session.authentication_token
    expires = datetime.fromisoformat(session.expires_at)
    assert (expires - datetime.fromisoformat(session.created)).total_seconds() == 900


def test_stream_accepts_up_to_100_events(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """The v2 stream takes 100 events a request with a session token."""
    m = subscribe(stripe_client)
    streamer = _stream_client(stripe_emulator, stripe_client)
    streamer.v2.billing.meter_event_stream.create({"events": _events(m.customer, 100)})
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 100
    with pytest.raises(stripe.InvalidRequestError) as caught:
        streamer.v2.billing.meter_event_stream.create({"events": _events(m.customer, 101, "x")})
    assert caught.value.http_status == 400


def test_stream_drops_duplicates_and_reports_them(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Like Stripe's asynchronous processing, duplicate identifiers are dropped and reported."""
    m = subscribe(stripe_client)
    streamer = _stream_client(stripe_emulator, stripe_client)
    streamer.v2.billing.meter_event_stream.create({"events": _events(m.customer, 3)})
    streamer.v2.billing.meter_event_stream.create({"events": _events(m.customer, 3)})
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 3
    assert [e["code"] for e in stripe_emulator.meter_event_errors()] == ["duplicate_meter_event"] * 3


def test_stream_refuses_expired_session(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """After 15 minutes the token gets Stripe's 401 temporary_session_expired."""
    m = subscribe(stripe_client)
    streamer = _stream_client(stripe_emulator, stripe_client)
    stripe_emulator.advance_clock(15 * 60)
    with pytest.raises(stripe.TemporarySessionExpiredError) as caught:
        streamer.v2.billing.meter_event_stream.create({"events": _events(m.customer, 1)})
    assert caught.value.http_status == 401
    assert caught.value.code == "billing_meter_event_session_expired"


def test_stream_refuses_api_key(stripe_client: stripe.StripeClient) -> None:
    """The stream authenticates with a session token, not a secret key."""
    with pytest.raises(stripe.AuthenticationError):
        stripe_client.v2.billing.meter_event_stream.create({"events": []})


@pytest.mark.anyio
async def test_stream_async(stripe_emulator: StripeEmulator) -> None:
    """The async session and stream calls work end to end."""
    client = stripe_emulator.client()
    m = subscribe(client)
    session = await client.v2.billing.meter_event_session.create_async()
    streamer = stripe_emulator.client(api_key=session.authentication_token)
    await streamer.v2.billing.meter_event_stream.create_async({"events": _events(m.customer, 50)})
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 50


def test_stream_validates_parameters(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Unknown fields in the v2 JSON body are refused like v1's unknown parameters."""
    streamer = _stream_client(stripe_emulator, stripe_client)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        streamer.v2.billing.meter_event_stream.create(
            cast(Any, {"events": [{"event_name": "x", "payload": {}, "colour": "red"}]})
        )
    assert caught.value.code == "parameter_unknown"
    assert caught.value.param == "events[0][colour]"
