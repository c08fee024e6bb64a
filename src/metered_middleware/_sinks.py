"""The three ways usage reaches Stripe, behind one small interface, and how Stripe's answers are classified.

Every sink goes through the official SDK's async methods (aiohttp underneath on asyncio, httpx under trio
or with ``METERED_HTTP_CLIENT=httpx``), one client per flusher, and sends
exactly the parameters it is given: the flusher derives them from the stored batch, so a retry is identical.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

import anyio
import httpcore
import httpx
import sniffio
import stripe
from stripe._base_address import BaseAddresses
from stripe.params.v2.billing import MeterEventStreamCreateParamsEvent

from metered_middleware._asyncio_net import AsyncioBackend
from metered_middleware._delivery_config import DeliverySettings, HTTPClientName, TransportName

__all__ = [
    "MeterEventStreamSink",
    "MeterEventsSink",
    "Outcome",
    "SendLine",
    "Sink",
    "UsageRecordsSink",
    "classify",
    "make_sink",
    "make_stripe_client",
    "pick_transport",
]

logger = logging.getLogger("metered_middleware.flusher")

OutcomeKind = Literal["delivered", "retry", "dead", "restamp"]
# Codes that say the line can never succeed as it is: it goes to the dead-letter with Stripe's error.
_STREAM_BATCH: Final = 100
# Renew a stream session this long before Stripe says it expires, so no request races the expiry.
_SESSION_MARGIN: Final = 60.0


@dataclass(frozen=True, slots=True)
class SendLine:
    """One line as Stripe will see it: every field comes from the stored batch and its stamp."""

    target_id: str
    customer: str
    subscription_item: str | None
    event_name: str | None
    units: int
    timestamp: int
    key: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with a line after Stripe answered (or did not)."""

    kind: OutcomeKind
    reason: str = ""
    error: Mapping[str, Any] = field(default_factory=dict)
    retry_after: float | None = None


DELIVERED: Final = Outcome("delivered")
_NO_EVENT_NAME: Final = Outcome("dead", "no_meter_event_name", {"message": "set METERED_METER_EVENT_NAME"})


class Sink(Protocol):
    """A Stripe mechanism usage is reported through."""

    name: str
    batch_limit: int

    def lock_key(self, line: SendLine) -> str:
        """Lines with the same lock key are never in flight together (one call per customer and meter)."""
        ...

    async def send(self, lines: Sequence[SendLine]) -> list[Outcome]:
        """Send up to ``batch_limit`` lines; one outcome per line, in order; Stripe errors never raise."""
        ...


def _error_info(exc: stripe.StripeError) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": type(exc).__name__,
        "status": exc.http_status,
        "code": exc.code,
        "message": exc.user_message or str(exc),
    }
    body = exc.json_body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        info["param"] = body["error"].get("param")
        info["stripe_type"] = body["error"].get("type")
    if exc.request_id:
        info["request_id"] = exc.request_id
    return info


def _header(exc: stripe.StripeError, name: str) -> str | None:
    for key, value in (exc.headers or {}).items():
        if key.lower() == name.lower():
            return str(value)
    return None


def _is_duplicate_identifier(info: Mapping[str, Any]) -> bool:
    message = str(info.get("message") or "").lower()
    return info.get("code") in {"resource_already_exists", "duplicate_meter_event"} or (
        "identifier" in message and ("already" in message or "duplicate" in message)
    )


def _is_closed_period(info: Mapping[str, Any]) -> bool:
    """Stripe refused the timestamp itself: the period it falls in is closed or out of the allowed window."""
    return info.get("status") == 400 and info.get("param") == "timestamp"


def classify(exc: Exception) -> Outcome:
    """Map a Stripe error onto an outcome (DESIGN invariant 5).

    Success and idempotent replay acknowledge (handled by the caller); a duplicate meter event
    identifier means an earlier attempt landed, so it acknowledges too. 429, 409, 5xx, timeouts and
    connection errors retry; ``Stripe-Should-Retry`` overrides the status when present. A refused
    timestamp asks for a re-stamp. Anything else Stripe refused for good goes to the dead-letter with
    Stripe's error.
    """
    if isinstance(exc, stripe.APIConnectionError):
        return Outcome("retry", "connection", {"type": type(exc).__name__, "message": str(exc)})
    if not isinstance(exc, stripe.StripeError):
        return Outcome("retry", "unexpected", {"type": type(exc).__name__, "message": str(exc)})
    info = _error_info(exc)
    status = exc.http_status or 0
    retry_after: float | None = None
    if (raw := _header(exc, "Retry-After")) is not None:
        try:
            retry_after = float(raw)
        except ValueError:
            retry_after = None
    if _is_duplicate_identifier(info):
        return DELIVERED
    should_retry = _header(exc, "Stripe-Should-Retry")
    if status == 429 or (should_retry == "true"):
        return Outcome("retry", "rate_limited" if status == 429 else "retryable", info, retry_after)
    if status in (401, 403) or isinstance(exc, stripe.TemporarySessionExpiredError):
        # A bad or expired key refuses everything; that is an outage to fix, not a property of the line.
        return Outcome("retry", "unauthorized", info, retry_after)
    if should_retry == "false" and status < 500:
        return _refused(info)
    if status == 409 or status >= 500 or status == 0:
        return Outcome("retry", "server_error", info, retry_after)
    return _refused(info)


def _refused(info: dict[str, Any]) -> Outcome:
    if _is_closed_period(info):
        return Outcome("restamp", "period_closed", info)
    if info.get("stripe_type") == "idempotency_error":
        # Never expected (parameters are a pure function of the batch); kept loudly rather than retried.
        return Outcome("dead", "idempotency_conflict", info)
    return Outcome("dead", "refused", info)


# Requests in flight per connection pool. httpcore checks every pooled connection on each request and each
# response close, so one pool of 16-32 connections costs more CPU per request than the request itself; one
# small pool per concurrent request, each request going to the least busy pool, keeps that check short
# (measured: 1.9 -> 1.0 ms CPU a request).
_CONNECTIONS_PER_POOL: Final = 1
_PROXY_SCHEMES: Final = ("http", "https", "all")
# httpx's default: an idle connection older than this is closed rather than reused.
_KEEPALIVE_EXPIRY: Final = 5.0
# What httpcore raises for a request that did not get its answer (each becomes the SDK's APIConnectionError).
_HTTPCORE_ERRORS: Final = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
)


class _HTTPXClient(stripe.HTTPClient):
    """The SDK's async HTTP client on httpx's stack, written the documented way: a ``stripe.HTTPClient``
    subclass.

    Requests go through one small keep-alive pool per concurrent request (the least busy one is picked),
    every connection reused for later requests. Without proxy variables in the environment, each pool is
    an ``httpcore.AsyncConnectionPool`` (the pool under ``httpx.AsyncHTTPTransport``, with httpx's
    keep-alive expiry) on :class:`AsyncioBackend`: for a Stripe call, httpx's own layers (its request and
    response models, request merging, cookies, auth, redirects) and anyio's streams cost more CPU than the
    request, and this is the flusher's hot path (measured: ~30% of the flusher's CPU a v1 line). With
    ``HTTP_PROXY``, ``HTTPS_PROXY`` or ``ALL_PROXY`` set, each pool is an ``httpx.AsyncClient``, which
    routes through the proxy (and honours ``NO_PROXY``) as the SDK's own ``HTTPXClient`` would. Any
    transport error becomes the SDK's ``APIConnectionError``, as in the SDK's client, so the flusher
    retries it.
    """

    name = "httpx"

    def __init__(self, timeout: float, concurrency: int | None = None) -> None:
        super().__init__()
        verify = ssl.create_default_context(cafile=stripe.ca_bundle_path)
        pools = max(1, -(-(concurrency or 1) // _CONNECTIONS_PER_POOL))
        # Room for one more request per pool than its share (the session call of the v2 stream).
        size = -(-(concurrency or 1) // pools) + 1
        self._extensions = {
            "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        }
        self._pools: list[httpcore.AsyncConnectionPool] = []
        self._clients: list[httpx.AsyncClient] = []
        environ = urllib.request.getproxies()
        if any(scheme in environ for scheme in _PROXY_SCHEMES):
            limits = httpx.Limits(
                max_connections=size, max_keepalive_connections=size, keepalive_expiry=_KEEPALIVE_EXPIRY
            )
            self._clients = [
                httpx.AsyncClient(verify=verify, limits=limits, timeout=httpx.Timeout(timeout))
                for _ in range(pools)
            ]
        else:
            backend = AsyncioBackend()
            self._pools = [
                httpcore.AsyncConnectionPool(
                    ssl_context=verify,
                    max_connections=size,
                    max_keepalive_connections=size,
                    keepalive_expiry=_KEEPALIVE_EXPIRY,
                    network_backend=backend,
                )
                for _ in range(pools)
            ]
        self._busy = [0] * pools

    def sleep_async(self, secs: float) -> Awaitable[None]:
        """The SDK's own retries sleep here (the flusher turns them off and retries itself)."""
        return anyio.sleep(secs)

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        """Send through the least busy pool; the body, status and headers Stripe answered."""
        index = self._busy.index(min(self._busy))
        self._busy[index] += 1
        try:
            if self._pools:
                content = post_data.encode() if isinstance(post_data, str) else post_data
                answer = await self._pools[index].request(
                    method.upper(),
                    url,
                    headers=list(headers.items()),
                    content=content,
                    extensions=self._extensions,
                )
                # A case-insensitive mapping, as the SDK reads its headers (Request-Id, Stripe-Should-Retry).
                return answer.content, answer.status, httpx.Headers(answer.headers)
            response = await self._clients[index].request(method, url, headers=headers, content=post_data)
        except (*_HTTPCORE_ERRORS, httpx.HTTPError) as exc:
            message = f"Unexpected error communicating with Stripe ({type(exc).__name__}: {exc})"
            raise stripe.APIConnectionError(message, should_retry=True) from exc  # type: ignore[no-untyped-call]
        finally:
            self._busy[index] -= 1
        return response.content, response.status_code, response.headers

    async def close_async(self) -> None:
        """Close every pool (idempotent)."""
        for pool in self._pools:
            await pool.aclose()
        for client in self._clients:
            await client.aclose()


def pick_transport(name: HTTPClientName) -> TransportName:
    """The transport ``METERED_HTTP_CLIENT`` names; for ``auto``, aiohttp where it can serve the flusher.

    aiohttp costs a v1 line about 60% of httpx's CPU, which is what takes one flusher past Stripe's 1,000
    v1 calls a second (``benchmarks/flusher.py``), so ``auto`` picks it when the flusher runs on asyncio
    and aiohttp can route through the environment's proxy. Under trio (aiohttp runs on asyncio only),
    with only ``ALL_PROXY`` set (which aiohttp ignores and httpx honours), or without aiohttp installed,
    ``auto`` is httpx.
    """
    if name != "auto":
        return name
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library != "asyncio" or importlib.util.find_spec("aiohttp") is None:
        return "httpx"
    from metered_middleware._http_aiohttp import routes_through  # imports aiohttp, now known installed

    return "aiohttp" if routes_through(urllib.request.getproxies()) else "httpx"


def make_stripe_client(settings: DeliverySettings) -> tuple[stripe.StripeClient, stripe.HTTPClient]:
    """One async SDK client for the flusher (no SDK retries: the flusher retries with the same parameters).

    Call it on the loop the flusher runs on: ``auto`` picks the transport by it (:func:`pick_transport`).
    """
    http: stripe.HTTPClient
    if pick_transport(settings.http_client) == "aiohttp":
        from metered_middleware._http_aiohttp import AIOHTTPClient  # an optional dependency

        http = AIOHTTPClient(timeout=settings.request_timeout, concurrency=settings.max_concurrency)
    else:
        http = _HTTPXClient(timeout=settings.request_timeout, concurrency=settings.max_concurrency)
    bases: BaseAddresses = {}
    if settings.api_base:
        bases["api"] = settings.api_base
    if settings.meter_events_base or settings.api_base:
        bases["meter_events"] = settings.meter_events_base or settings.api_base
    client = stripe.StripeClient(
        settings.stripe_api_key, http_client=http, base_addresses=bases, max_network_retries=0
    )
    return client, http


async def _guard(call: Any) -> Outcome:
    try:
        await call
    except stripe.StripeError as exc:
        return classify(exc)
    return DELIVERED


class UsageRecordsSink:
    """Legacy usage records on the subscription item (``action=increment``), on a pre-2025-03-31 API."""

    name = "usage_records"
    batch_limit = 1

    def __init__(self, client: stripe.StripeClient, legacy_api_version: str) -> None:
        self.client = client
        self.legacy_api_version = legacy_api_version

    def lock_key(self, line: SendLine) -> str:
        """Usage records serialise per subscription item."""
        return line.subscription_item or line.customer

    async def send(self, lines: Sequence[SendLine]) -> list[Outcome]:
        """Create one usage record per line, with the line's key as the idempotency key."""
        return [await self._send_one(line) for line in lines]

    async def _send_one(self, line: SendLine) -> Outcome:
        if not line.subscription_item:
            return Outcome("dead", "no_subscription_item", {"message": "target has no subscription item"})
        # raw_request takes request options as top-level keywords (extract_options_from_dict pops them).
        return await _guard(
            self.client.raw_request_async(
                "post",
                f"/v1/subscription_items/{line.subscription_item}/usage_records",
                quantity=line.units,
                timestamp=line.timestamp,
                action="increment",
                stripe_version=self.legacy_api_version,
                idempotency_key=line.key,
            )
        )


class MeterEventsSink:
    """Billing meter events (v1): ``identifier`` deduplicates, ``timestamp`` places the usage."""

    name = "meter_events"
    batch_limit = 1

    def __init__(self, client: stripe.StripeClient, default_event_name: str | None = None) -> None:
        self.client = client
        self.default_event_name = default_event_name

    def lock_key(self, line: SendLine) -> str:
        """Stripe allows one concurrent call per customer and meter."""
        return f"{line.customer}|{line.event_name or self.default_event_name}"

    async def send(self, lines: Sequence[SendLine]) -> list[Outcome]:
        """Create one meter event per line; the identifier (and idempotency key) is the line's key."""
        return [await self._send_one(line) for line in lines]

    async def _send_one(self, line: SendLine) -> Outcome:
        event_name = line.event_name or self.default_event_name
        if not event_name:
            return _NO_EVENT_NAME
        # raw_request: the same request, error mapping and idempotency key as ``meter_events.create``,
        # without building a MeterEvent object from the answer (nothing reads it).
        return await _guard(
            self.client.raw_request_async(
                "post",
                "/v1/billing/meter_events",
                event_name=event_name,
                payload={"stripe_customer_id": line.customer, "value": str(line.units)},
                identifier=line.key,
                timestamp=line.timestamp,
                idempotency_key=line.key,
            )
        )


@functools.lru_cache(maxsize=1024)
def _iso(timestamp: int) -> str:
    # Cached: a batch's lines share their claim time, so a stream request formats one timestamp, not 100.
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class _StreamEvents(list[Any]):
    """One stream request's events: sent as the JSON array they are, logged by the SDK as one placeholder.

    For every request the SDK form-encodes the parameters, even for a v2 call whose body it then writes as
    JSON: the encoding is only for its debug log ("Post details"). With 100 events that was ~10 URL quotes
    an event, about a third of the flusher's CPU for this sink. The SDK's encoder takes a value with an
    ``id`` as that id (an expandable object's shorthand), so this list encodes to one short string, while
    ``json.dumps`` still writes it as a list: the request body is the same either way.
    """

    id = "events"


class MeterEventStreamSink:
    """The v2 meter event stream: up to 100 events a request, authenticated by a short-lived session token.

    The token is renewed ahead of its expiry; if Stripe still says it expired, it is renewed and the same
    events (same identifiers) are sent again, which the stream deduplicates.
    """

    name = "meter_event_stream"
    batch_limit = _STREAM_BATCH

    def __init__(self, client: stripe.StripeClient, default_event_name: str | None = None) -> None:
        self.client = client
        self.default_event_name = default_event_name
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = anyio.Lock()
        self.sessions_created = 0

    def lock_key(self, line: SendLine) -> str:
        """One request in flight per customer and meter, as for v1 meter events."""
        return f"{line.customer}|{line.event_name or self.default_event_name}"

    async def _session(self, *, renew: bool = False) -> str:
        async with self._lock:
            if renew or self._token is None or time.time() >= self._expires_at - _SESSION_MARGIN:
                session = await self.client.v2.billing.meter_event_session.create_async()
                self._token = session.authentication_token
                self._expires_at = _epoch(session.expires_at)
                self.sessions_created += 1
            return self._token

    async def send(self, lines: Sequence[SendLine]) -> list[Outcome]:
        """Send the lines that have an event name in one request; the outcome applies to all of them."""
        outcomes: list[Outcome | None] = [None] * len(lines)
        events: list[MeterEventStreamCreateParamsEvent] = []
        index: list[int] = []
        for i, line in enumerate(lines):
            event_name = line.event_name or self.default_event_name
            if not event_name:
                outcomes[i] = Outcome(
                    "dead", "no_meter_event_name", {"message": "set METERED_METER_EVENT_NAME"}
                )
                continue
            events.append(
                {
                    "event_name": event_name,
                    "identifier": line.key,
                    "payload": {"stripe_customer_id": line.customer, "value": str(line.units)},
                    "timestamp": _iso(line.timestamp),
                }
            )
            index.append(i)
        if events:
            outcome = await self._send_events(events)
            for i in index:
                outcomes[i] = outcome
        return [o or DELIVERED for o in outcomes]

    async def _send_events(self, events: list[MeterEventStreamCreateParamsEvent]) -> Outcome:
        renewed = False
        while True:
            try:
                token = await self._session(renew=renewed)
                await self.client.v2.billing.meter_event_stream.create_async(
                    {"events": _StreamEvents(events)}, {"api_key": token}
                )
            except stripe.StripeError as exc:
                outcome = classify(exc)
                expired = isinstance(exc, stripe.TemporarySessionExpiredError) or (
                    exc.http_status == 401 and "session" in str(exc.code or exc.user_message or "").lower()
                )
                if expired and not renewed:
                    logger.info(
                        "meter event session expired; renewing and resending the same identifiers",
                        extra={
                            "event": "session_renewed",
                            "sink": self.name,
                            "outcome": "retry",
                            "reason": "session_expired",
                            "identifiers": [e["identifier"] for e in events],
                            "stripe_code": exc.code,
                            "stripe_status": exc.http_status,
                        },
                    )
                    renewed = True
                    continue
                return outcome
            return DELIVERED


def make_sink(settings: DeliverySettings, client: stripe.StripeClient) -> Sink:
    """The sink ``settings.sink`` names."""
    if settings.sink == "usage_records":
        return UsageRecordsSink(client, settings.legacy_api_version)
    if settings.sink == "meter_event_stream":
        return MeterEventStreamSink(client, settings.meter_event_name)
    return MeterEventsSink(client, settings.meter_event_name)
