"""Idempotency keys, rate limiting, faults on demand and latency."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import pytest
import stripe

from metered_middleware.testing.emulator import StripeEmulator

from ._helpers import LEGACY, subscribe


def _event(
    client: stripe.StripeClient,
    customer: str,
    value: int = 1,
    key: str | None = None,
    identifier: str | None = None,
) -> Any:
    params: Any = {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": customer, "value": str(value)},
    }
    if identifier:
        params["identifier"] = identifier
    return client.v1.billing.meter_events.create(params, {"idempotency_key": key} if key else {})


def _headers(obj: stripe.StripeObject) -> Mapping[str, str]:
    assert obj.last_response is not None
    return obj.last_response.headers


# -- idempotency ----------------------------------------------------------------------------------


def test_same_key_same_params_replays_first_response(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """A repeated Idempotency-Key with the same parameters replays the stored answer, once applied."""
    first = stripe_client.v1.customers.create({"email": "x@example.com"}, {"idempotency_key": "k1"})
    again = stripe_client.v1.customers.create({"email": "x@example.com"}, {"idempotency_key": "k1"})
    assert again.id == first.id
    assert _headers(again)["Idempotent-Replayed"] == "true"
    assert len(stripe_client.v1.customers.list().data) == 1
    assert [r.replayed for r in stripe_emulator.requests("customers.create")] == [False, True]


def test_same_key_other_params_is_idempotency_error(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Reusing a key with different parameters is a 400 idempotency_error and is counted."""
    stripe_client.v1.customers.create({"email": "x@example.com"}, {"idempotency_key": "k2"})
    with pytest.raises(stripe.IdempotencyError) as caught:
        stripe_client.v1.customers.create({"email": "y@example.com"}, {"idempotency_key": "k2"})
    assert caught.value.http_status == 400
    assert stripe_emulator.idempotency_conflicts == 1


def test_replayed_errors_are_replayed_too(stripe_client: stripe.StripeClient) -> None:
    """A handler's error is stored with the key: the retry gets the same error, not a new attempt."""
    m = subscribe(stripe_client)
    _event(stripe_client, m.customer, identifier="dup")
    for _ in range(2):
        with pytest.raises(stripe.InvalidRequestError) as caught:
            _event(stripe_client, m.customer, identifier="dup", key="same")
        assert caught.value.code == "duplicate_meter_event"
    assert caught.value.headers is not None
    assert caught.value.headers.get("Idempotent-Replayed") == "true"


def test_idempotency_keys_expire_after_24_hours(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """After 24 h of emulated time a key is forgotten and the request runs again."""
    first = stripe_client.v1.customers.create({}, {"idempotency_key": "old"})
    stripe_emulator.advance_clock(24 * 3600 + 1)
    second = stripe_client.v1.customers.create({}, {"idempotency_key": "old"})
    assert second.id != first.id


def test_validation_errors_are_not_stored(stripe_client: stripe.StripeClient) -> None:
    """A request refused by validation leaves its key free for a corrected retry."""
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.customers.create(cast(Any, {"bogus": 1}), {"idempotency_key": "fix"})
    assert stripe_client.v1.customers.create({}, {"idempotency_key": "fix"}).id.startswith("cus_")


@pytest.mark.anyio
async def test_idempotent_replay_async(stripe_emulator: StripeEmulator) -> None:
    """Async requests replay the same way."""
    client = stripe_emulator.client()
    first = await client.v1.customers.create_async({}, {"idempotency_key": "ak"})
    again = await client.v1.customers.create_async({}, {"idempotency_key": "ak"})
    assert again.id == first.id


# -- rate limiting --------------------------------------------------------------------------------


def test_rate_limit_token_bucket(stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient) -> None:
    """Beyond the bucket's burst, requests get 429 rate_limit; turning it off lets them through."""
    stripe_emulator.rate_limit = 5
    outcomes: list[int | None] = []
    codes = []
    for _ in range(12):
        try:
            stripe_client.v1.customers.list()
            outcomes.append(200)
        except stripe.RateLimitError as exc:
            outcomes.append(exc.http_status)
            codes.append(cast(Any, exc.json_body)["error"]["code"])
    assert set(codes) == {"rate_limit"}
    assert outcomes.count(429) >= 5
    assert outcomes[:5] == [200] * 5
    stripe_emulator.rate_limit = None
    for _ in range(20):
        stripe_client.v1.customers.list()


def test_rate_limit_refills(stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient) -> None:
    """Once the bucket is empty calls get 429, and a fifth of a second later (4 tokens at 20/s) they pass."""
    stripe_emulator.rate_limit = 20
    limited = 0
    for _ in range(60):
        try:
            stripe_client.v1.customers.list()
        except stripe.RateLimitError:
            limited += 1
            break
    assert limited == 1, "60 calls at once never met the 20/s limit"
    time.sleep(0.2)
    stripe_client.v1.customers.list()


def test_429_comes_before_idempotency(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """A rate-limited request stores nothing: the retry with the same key runs for real."""
    stripe_emulator.inject("customers.create", "429")
    with pytest.raises(stripe.RateLimitError):
        stripe_client.v1.customers.create({}, {"idempotency_key": "rl"})
    created = stripe_client.v1.customers.create({}, {"idempotency_key": "rl"})
    assert "Idempotent-Replayed" not in _headers(created)


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error"), [("500", stripe.APIError), ("503", stripe.APIError)])
def test_server_error_faults_apply_nothing(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient, kind: str, error: type[Exception]
) -> None:
    """A 500 or 503 fault fails the call before any write."""
    m = subscribe(stripe_client)
    stripe_emulator.inject("meter_events.create", kind, times=2)
    for _ in range(2):
        with pytest.raises(error) as caught:
            _event(stripe_client, m.customer, 5)
        assert getattr(caught.value, "http_status", None) == int(kind)
    _event(stripe_client, m.customer, 5)
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 5


def test_wildcard_fault_hits_any_operation(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """`"*"` faults apply to whatever operation comes next."""
    stripe_emulator.inject("*", "429")
    with pytest.raises(stripe.RateLimitError):
        stripe_client.v1.products.list()
    stripe_client.v1.products.list()


def test_timeout_fault_outlasts_client_and_writes_nothing(
    stripe_emulator: StripeEmulator,
) -> None:
    """A timeout fault holds the request past the client's timeout; nothing is written."""
    client = stripe_emulator.client(timeout=0.3)
    m = subscribe(client)
    stripe_emulator.inject("meter_events.create", "timeout")
    with pytest.raises(stripe.APIConnectionError):
        _event(client, m.customer, 3)
    deadline = time.monotonic() + 5
    while not stripe_emulator.requests("meter_events.create") and time.monotonic() < deadline:
        time.sleep(0.01)
    # The server saw the client leave and gave up too, so nothing can land later.
    assert [r.status for r in stripe_emulator.requests("meter_events.create")] == [0]
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 0


def test_timeout_fault_with_delay_is_served_late(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """With a delay shorter than the client's timeout the call is slow but succeeds."""
    stripe_emulator.inject("customers.create", "timeout", delay=0.2)
    started = time.monotonic()
    stripe_client.v1.customers.create({})
    assert time.monotonic() - started >= 0.2


def test_commit_then_500_applies_write_and_replays(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Commit-then-500: the event lands, the SDK raises, and the retry with the same key replays."""
    m = subscribe(stripe_client)
    stripe_emulator.inject("meter_events.create", "commit_then_500")
    with pytest.raises(stripe.APIError):
        _event(stripe_client, m.customer, 7, key="lost", identifier="lost-1")
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 7
    replay = _event(stripe_client, m.customer, 7, key="lost", identifier="lost-1")
    assert _headers(replay)["Idempotent-Replayed"] == "true"
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 7


def test_commit_then_drop_applies_write_and_drops_connection(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Commit-then-drop: the usage record lands but the connection dies before the answer."""
    m = subscribe(stripe_client, legacy=True)
    stripe_emulator.inject("usage_records.create", "commit_then_drop")
    with pytest.raises(stripe.APIConnectionError):
        stripe_client.raw_request(
            "post",
            f"/v1/subscription_items/{m.item}/usage_records",
            quantity=11,
            stripe_version=LEGACY,
        )
    assert stripe_emulator.usage_record_total(m.item) == 11
    assert stripe_emulator.requests("usage_records.create")[-1].fault == "commit_then_drop"


def test_naive_retry_after_lost_response_bills_twice(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """Why deterministic keys matter: a retry with a fresh key after a lost answer double-bills."""
    m = subscribe(stripe_client)
    stripe_emulator.inject("meter_events.create", "commit_then_500")
    with pytest.raises(stripe.APIError):
        _event(stripe_client, m.customer, 4)
    _event(stripe_client, m.customer, 4)
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 8


@pytest.mark.anyio
async def test_faults_async_stream(stripe_emulator: StripeEmulator) -> None:
    """Faults hit the v2 stream too, with commit-then-drop landing the batch."""
    client = stripe_emulator.client()
    m = subscribe(client)
    session = await client.v2.billing.meter_event_session.create_async()
    streamer = stripe_emulator.client(api_key=session.authentication_token)
    events: Any = [
        {
            "event_name": "api_requests",
            "identifier": "s1",
            "payload": {"stripe_customer_id": m.customer, "value": "2"},
        }
    ]
    stripe_emulator.inject("meter_event_stream.create", "503")
    with pytest.raises(stripe.APIError):
        await streamer.v2.billing.meter_event_stream.create_async({"events": events})
    stripe_emulator.inject("meter_event_stream.create", "commit_then_drop")
    with pytest.raises(stripe.APIConnectionError):
        await streamer.v2.billing.meter_event_stream.create_async({"events": events})
    assert stripe_emulator.meter_event_total(m.customer, "api_requests") == 2


def test_latency_is_added(stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient) -> None:
    """`set_latency` delays each call of the operation; clear_faults removes it."""
    stripe_emulator.set_latency("customers.list", 0.15)
    started = time.monotonic()
    stripe_client.v1.customers.list()
    assert time.monotonic() - started >= 0.15
    stripe_emulator.clear_faults()
    started = time.monotonic()
    stripe_client.v1.customers.list()
    assert time.monotonic() - started < 0.15


def test_unknown_fault_kind_is_rejected(stripe_emulator: StripeEmulator) -> None:
    """A typo in a fault kind fails loudly instead of silently never firing."""
    with pytest.raises(ValueError, match="unknown fault kind"):
        stripe_emulator.inject("customers.create", "502")


def test_request_log_records_operations(
    stripe_emulator: StripeEmulator, stripe_client: stripe.StripeClient
) -> None:
    """The request log names the operation, params, key and status of each call."""
    stripe_client.v1.customers.create({"email": "log@example.com"}, {"idempotency_key": "log"})
    record = stripe_emulator.requests("customers.create")[0]
    assert record.params == {"email": "log@example.com"}
    assert record.idempotency_key == "log"
    assert record.status == 200
