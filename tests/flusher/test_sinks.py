"""The v1 sinks' requests as Stripe receives them, and the flusher's HTTP client under proxies and outages."""

from __future__ import annotations

import socket

import anyio
import pytest
import redis.asyncio as aioredis
from anyio.abc import SocketAttribute, SocketStream

from metered_middleware import BillingTarget
from metered_middleware._delivery import line_key
from metered_middleware._delivery_config import HTTP_CLIENTS, DeliverySettings, HTTPClientName
from metered_middleware._errors import ConfigurationError
from metered_middleware._sinks import MeterEventsSink, SendLine, make_sink, make_stripe_client, pick_transport
from metered_middleware.testing.emulator import StripeEmulator

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
@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
@pytest.mark.parametrize("world", ["meter_events", "usage_records"], indirect=True)
async def test_v1_lines_carry_their_key_as_idempotency_key_and_identifier(
    world: World, http_client: HTTPClientName
) -> None:
    """Each v1 request sends the line's key as its idempotency key (and meter event identifier), through
    either transport."""
    world.http_client = http_client
    target, key = await _deliver_one(world)
    sent = [r for r in world.emu.requests() if r.operation == f"{world.sink}.create"]
    assert [r.idempotency_key for r in sent] == [key]
    assert [r.http_library for r in sent] == [http_client]
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


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_a_refused_connection_is_retried_not_raised(
    monkeypatch: pytest.MonkeyPatch, http_client: HTTPClientName
) -> None:
    """Stripe unreachable: the line's outcome is a retry for a connection error, nothing raises."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = DeliverySettings(
        stripe_api_key="sk_test_x", api_base=f"http://127.0.0.1:{_closed_port()}", http_client=http_client
    )
    client, http = make_stripe_client(settings)
    try:
        outcomes = await MeterEventsSink(client, EVENT).send([_line()])
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert [(o.kind, o.reason) for o in outcomes] == [("retry", "connection")]


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_requests_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch, http_client: HTTPClientName
) -> None:
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
    settings = DeliverySettings(stripe_api_key="sk_test_x", api_base=api_base, http_client=http_client)
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


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
@pytest.mark.parametrize("world", ["meter_events"], indirect=True)
async def test_no_proxy_sends_the_hosts_it_names_directly(
    world: World, monkeypatch: pytest.MonkeyPatch, http_client: HTTPClientName
) -> None:
    """A host in NO_PROXY is reached directly even with HTTP_PROXY set (here to a port nobody listens on)."""
    for name in ("http_proxy", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    world.http_client = http_client
    target, _ = await _deliver_one(world)
    assert world.stripe_total(target) == 7


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
@pytest.mark.parametrize("world", ["meter_event_stream"], indirect=True)
async def test_stream_events_carry_their_key_as_identifier(world: World, http_client: HTTPClientName) -> None:
    """The v2 stream has no idempotency key: each event's identifier is the line's key, sent unchanged."""
    world.http_client = http_client
    target, key = await _deliver_one(world)
    sent = [r for r in world.emu.requests() if r.operation == "meter_event_stream.create"]
    assert [[e["identifier"] for e in r.params["events"]] for r in sent] == [[key]]
    assert [r.http_library for r in sent] == [http_client]
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


def test_an_unknown_or_missing_http_client_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """METERED_HTTP_CLIENT is auto (the default), httpx or aiohttp; aiohttp named without the package
    installed says how to install it, where auto falls back to httpx."""
    env = {"STRIPE_API_KEY": "sk_test_x"}
    assert DeliverySettings.from_env(env).http_client == "auto"
    assert DeliverySettings.from_env({**env, "METERED_HTTP_CLIENT": " AIOHTTP "}).http_client == "aiohttp"
    assert DeliverySettings.from_env({**env, "METERED_HTTP_CLIENT": "httpx"}).http_client == "httpx"
    expected = r"METERED_HTTP_CLIENT='requests' is not valid: 'auto' or 'httpx' or 'aiohttp'"
    with pytest.raises(ConfigurationError, match=expected):
        DeliverySettings.from_env({**env, "METERED_HTTP_CLIENT": "requests"})
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigurationError, match=r"pip install 'metered-middleware\[aiohttp\]'"):
        DeliverySettings.from_env({**env, "METERED_HTTP_CLIENT": "aiohttp"})
    assert DeliverySettings.from_env(env).http_client == "auto"


async def test_auto_falls_back_to_httpx_where_aiohttp_would_not_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On asyncio auto is aiohttp, except with only ALL_PROXY set (aiohttp would go past that proxy) or
    without aiohttp installed: then it is httpx, and the client starts rather than refusing."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = DeliverySettings(stripe_api_key="sk_test_x")
    assert (settings.http_client, pick_transport("auto")) == ("auto", "aiohttp")
    assert (pick_transport("httpx"), pick_transport("aiohttp")) == ("httpx", "aiohttp")

    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:3128")
    assert pick_transport("auto") == "httpx"
    _, http = make_stripe_client(settings)
    assert http.name == "httpx"
    await http.close_async()  # type: ignore[no-untyped-call]
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")  # one aiohttp routes through
    assert pick_transport("auto") == "aiohttp"
    monkeypatch.delenv("ALL_PROXY")
    monkeypatch.delenv("HTTPS_PROXY")

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else real_find_spec(name, *a)
    )
    assert pick_transport("auto") == "httpx"


def test_auto_outside_an_event_loop_is_httpx() -> None:
    """A client made outside any loop may be used on either: httpx runs on both."""
    assert pick_transport("auto") == "httpx"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_by_default_lines_go_through_aiohttp_on_asyncio_and_httpx_under_trio(
    emulator: StripeEmulator, redis_url: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default transport is the one that keeps up with Stripe's v1 ceiling where it can run, and the
    flusher still delivers under trio (aiohttp runs on asyncio only)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    # The Redis client is never used: a sink sends without Redis (and this one would not run under trio).
    world = World(emulator, "meter_events", aioredis.Redis.from_url(redis_url), redis_url)
    assert world.settings().http_client == "auto"
    target, key = await _deliver_one(world)
    sent = [r for r in world.emu.requests() if r.operation == "meter_events.create"]
    assert [r.idempotency_key for r in sent] == [key]
    assert [r.http_library for r in sent] == [{"asyncio": "aiohttp", "trio": "httpx"}[anyio_backend]]
    assert world.stripe_total(target) == 7


async def test_aiohttp_refuses_an_all_proxy_it_would_not_route_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp honours HTTP(S)_PROXY but not ALL_PROXY: with only ALL_PROXY set it is refused at start,
    rather than sending to Stripe directly past the proxy the environment names."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:3128")
    settings = DeliverySettings(stripe_api_key="sk_test_x", http_client="aiohttp")
    with pytest.raises(ConfigurationError, match="does not route through ALL_PROXY"):
        make_stripe_client(settings)
    _, http = make_stripe_client(settings.replace(http_client="httpx"))  # httpx routes through it
    await http.close_async()  # type: ignore[no-untyped-call]
