"""The v1 sinks' requests as Stripe receives them, and the flusher's HTTP client under proxies and outages."""

from __future__ import annotations

import socket

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from metered_middleware import BillingTarget
from metered_middleware._delivery import line_key
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._sinks import MeterEventsSink, SendLine, make_sink, make_stripe_client

from .conftest import EVENT, World

pytestmark = pytest.mark.anyio


async def _deliver_one(world: World) -> tuple[BillingTarget, str]:
    """Send one 7-unit line through the world's sink; it must be delivered. Returns its target and key."""
    target = world.subscribe("keyed")
    key = line_key("mm", 0, 1, 1_700_000_000_000, 1, target.target_id)
    assert target.period_start is not None
    line = SendLine(
        target.target_id, target.customer, target.subscription_item, EVENT, 7, target.period_start, key
    )
    settings = world.settings()
    client, http = make_stripe_client(settings)
    try:
        outcomes = await make_sink(settings, client).send([line])
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert [o.kind for o in outcomes] == ["delivered"]
    return target, key


# The v1 sinks; the v2 stream has no idempotency key (its identifiers: the next test).
@pytest.mark.parametrize("world", ["meter_events", "usage_records"], indirect=True)
async def test_v1_lines_carry_their_key_as_idempotency_key_and_identifier(world: World) -> None:
    """Each v1 request sends the line's key as its idempotency key (and meter event identifier)."""
    target, key = await _deliver_one(world)
    sent = [r for r in world.emu.requests() if r.operation == f"{world.sink}.create"]
    assert [r.idempotency_key for r in sent] == [key]
    if world.sink == "meter_events":
        assert sent[0].params["identifier"] == key
        assert sent[0].params["payload"] == {"stripe_customer_id": target.customer, "value": "7"}
    assert world.stripe_total(target) == 7


def _line() -> SendLine:
    return SendLine("cus_x||api_requests", "cus_x", None, EVENT, 1, 1_700_000_000, "mm-0-1-1-abc")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_refused_connection_is_retried_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stripe unreachable: the line's outcome is a retry for a connection error, nothing raises."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = DeliverySettings(stripe_api_key="sk_test_x", api_base=f"http://127.0.0.1:{_closed_port()}")
    client, http = make_stripe_client(settings)
    try:
        outcomes = await MeterEventsSink(client, EVENT).send([_line()])
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert [(o.kind, o.reason) for o in outcomes] == [("retry", "connection")]


async def test_requests_go_through_the_proxy_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, the flusher's requests go through that proxy, as with the SDK's own client."""
    seen: list[bytes] = []
    body = b'{"object": "billing.meter_event", "event_name": "api_requests"}'

    async def proxy(stream: SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, _, rest = data.partition(b"\r\n\r\n")
            headers = [h.lower() for h in head.split(b"\r\n")]
            length = next(int(h.split(b":", 1)[1]) for h in headers if h.startswith(b"content-length"))
            while len(rest) < length:
                rest += await stream.receive()
            seen.append(head.split(b"\r\n", 1)[0])
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)  # noqa: S610 (anyio's typed attributes, not Django's)
    for name in ("NO_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    # Not listening: reached directly, the request would fail with a connection error.
    api_base = f"http://127.0.0.1:{_closed_port()}"
    settings = DeliverySettings(stripe_api_key="sk_test_x", api_base=api_base)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy)
        client, http = make_stripe_client(settings)
        try:
            outcomes = await MeterEventsSink(client, EVENT).send([_line()])
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
        tg.cancel_scope.cancel()
    assert [o.kind for o in outcomes] == ["delivered"]
    assert seen == [f"POST {api_base}/v1/billing/meter_events HTTP/1.1".encode()]


@pytest.mark.parametrize("world", ["meter_event_stream"], indirect=True)
async def test_stream_events_carry_their_key_as_identifier(world: World) -> None:
    """The v2 stream has no idempotency key: each event's identifier is the line's key, sent unchanged."""
    target, key = await _deliver_one(world)
    sent = [r for r in world.emu.requests() if r.operation == "meter_event_stream.create"]
    assert [[e["identifier"] for e in r.params["events"]] for r in sent] == [[key]]
    event = sent[0].params["events"][0]
    assert event["event_name"] == EVENT
    assert event["payload"] == {"stripe_customer_id": target.customer, "value": "7"}
    assert world.stripe_total(target) == 7


def test_stream_events_are_one_placeholder_in_the_sdks_form_encoding_and_a_list_in_json() -> None:
    """The SDK form-encodes every request's parameters for its debug log, even a v2 JSON call's: the
    events list must be one placeholder there (a third of the sink's CPU otherwise), and the same JSON
    array in the body."""
    import json

    from stripe._encode import _api_encode

    from metered_middleware._sinks import _StreamEvents

    events = [{"identifier": f"k{i}", "payload": {"value": "1"}} for i in range(100)]
    assert list(_api_encode({"events": _StreamEvents(events)})) == [("events", "events")]
    assert json.loads(json.dumps({"events": _StreamEvents(events)})) == {"events": events}
