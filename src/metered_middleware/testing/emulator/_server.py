"""`StripeEmulator`: the handle tests and the CLI use to run the emulator and look inside it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from types import TracebackType
from typing import Any

import stripe

from ._app import EmulatorApp
from ._billing import usage_quantity
from ._common import Ctx
from ._faults import Faults, TokenBucket
from ._invoices import complete_checkout
from ._state import MeterEvent, RequestRecord, State
from ._webhooks import Delivery, WebhookSender

#: Stripe's test-mode rate limit.
DEFAULT_RATE_LIMIT = 25.0


class StripeEmulator:
    """A stateful Stripe test-mode API on 127.0.0.1, for the official SDK to talk to over HTTP.

    Start it (or use it as a context manager), point a client at `url` (or take `client()`), and
    inspect what Stripe would now hold: usage totals, meter events, invoices, requests seen.
    Faults (`inject`) and latency (`set_latency`) apply per operation name, or to `"*"`.
    """

    def __init__(
        self,
        rate_limit: float | None = DEFAULT_RATE_LIMIT,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.state = State()
        self._faults = Faults()
        self._bucket = TokenBucket(rate_limit)
        self._default_rate = rate_limit
        self._webhooks = WebhookSender(webhook_url, webhook_secret)
        self.state.on_event = self._webhooks.enqueue
        self.app = EmulatorApp(self.state, self._faults, self._bucket)
        self._host, self._port = host, port
        self._socket: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._clients: list[EmulatorHTTPXClient] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.listen(1024)
        self._socket = sock
        self.state.base_url = self.url
        return sock

    def _make_server(self) -> Any:
        # uvicorn is only needed to serve; the ASGI app itself runs on any server.
        import uvicorn

        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            log_config=None,
            lifespan="off",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        return uvicorn.Server(config)

    def start(self) -> StripeEmulator:
        """Serve on a free port (or the one given) in a background thread; returns self."""
        if self._thread is not None:
            return self
        sock = self._bind()
        server = self._server = self._make_server()
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="stripe-emulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Stripe emulator failed to start")
            time.sleep(0.005)
        return self

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until interrupted (what the CLI does).

        `on_ready` gets the base URL once the port is bound, before requests are served.
        """
        sock = self._bind()
        if on_ready is not None:
            on_ready(self.url)
        self._server = self._make_server()
        try:
            self._server.run(sockets=[sock])
        finally:
            self._close_socket()
            self._webhooks.close()

    def stop(self) -> None:
        """Stop serving and close every client handed out; safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._thread = self._server = None
        self._close_socket()
        self.close_clients()
        self._webhooks.close()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> StripeEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base address, `http://127.0.0.1:PORT`, for both `api` and `meter_events`."""
        if self._socket is None:
            raise RuntimeError("the Stripe emulator is not started")
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def client(
        self,
        api_key: str = "sk_test_emulator",
        *,
        timeout: float = 30.0,
        keepalive: bool = False,
        **kwargs: Any,
    ) -> stripe.StripeClient:
        """A `StripeClient` pointed at the emulator (sync and async), with no network retries.

        `stop()` (or `close_clients()`) closes it; `reset()` only drops its idle connections.
        Async requests use a fresh connection each, so no socket outlives an async test's loop.
        `keepalive=True` keeps async connections open between requests, which is faster for
        throughput runs; then `await http_client.aclose()` before the loop ends. Pass
        `http_client=` to bring your own (you close it then).
        """
        http_client = kwargs.pop("http_client", None)
        if http_client is None:
            http_client = EmulatorHTTPXClient(timeout=timeout, keepalive=keepalive)
            self._clients.append(http_client)
        kwargs.setdefault("max_network_retries", 0)
        return stripe.StripeClient(
            api_key,
            base_addresses={"api": self.url, "meter_events": self.url},
            http_client=http_client,
            **kwargs,
        )

    def close_clients(self) -> None:
        """Close the connections of every client `client()` created."""
        clients, self._clients = self._clients, []
        for http_client in clients:
            http_client.close()

    # -- control ----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Wipe all objects, events, idempotency keys, faults, latency and the clock offset.

        Clients from `client()` stay usable; their idle connections are closed.
        """
        for http_client in self._clients:
            http_client.release_connections()
        self._webhooks.wait(timeout=5)
        with self.state.lock:
            self.state.wipe()
            self.app.idempotency.clear()
        self._faults.clear()
        self._webhooks.deliveries.clear()
        self._bucket.set_rate(self._bucket.rate)

    @property
    def rate_limit(self) -> float | None:
        """Requests a second before 429 `rate_limit`; None turns limiting off."""
        return self._bucket.rate

    @rate_limit.setter
    def rate_limit(self, rate: float | None) -> None:
        self._bucket.set_rate(rate)

    def now(self) -> int:
        """The emulated wall clock (real time plus `advance_clock` offsets)."""
        with self.state.lock:
            return self.state.now()

    def advance_clock(self, seconds: int) -> None:
        """Move the emulated wall clock forward (idempotency keys, identifiers, session tokens)."""
        if seconds < 0:
            raise ValueError("the emulated clock only moves forward")
        with self.state.lock:
            self.state.clock_offset += seconds

    def inject(self, operation: str, kind: str, times: int = 1, *, delay: float | None = None) -> None:
        """Make the next `times` calls of `operation` (or `"*"`) fail with `kind`.

        Kinds: "429", "500", "503" (nothing applied), "timeout" (held until the client gives up,
        or for `delay` seconds after which it is served normally), "commit_then_500" and
        "commit_then_drop" (applied and its idempotency key stored, but the client gets a 500
        or a dropped connection).
        """
        self._faults.inject(operation, kind, times, delay)

    def set_latency(self, operation: str, seconds: float) -> None:
        """Delay every call of `operation` (or `"*"`) by `seconds` before it is handled."""
        self._faults.set_latency(operation, seconds)

    def clear_faults(self) -> None:
        """Drop queued faults and latency."""
        self._faults.clear()

    def set_webhook(self, url: str | None, secret: str | None) -> None:
        """Where signed events go (None: nowhere) and the `whsec_...` secret that signs them."""
        self._webhooks.configure(url, secret)

    def wait_webhooks(self, timeout: float = 10.0) -> bool:
        """Block until every event so far was delivered (or failed); False on timeout."""
        return self._webhooks.wait(timeout)

    def webhook_deliveries(self) -> list[Delivery]:
        """Every delivery attempt: event id, type, URL and the endpoint's status (or error)."""
        return list(self._webhooks.deliveries)

    def complete_checkout(self, session_id: str, *, test_clock: str | None = None) -> dict[str, str]:
        """Complete a `mode=subscription` Checkout Session as a paying customer would.

        Creates the customer (on `test_clock` if given) and the subscription, marks the session
        complete and sends `checkout.session.completed` and `customer.subscription.created`
        webhooks; returns once they were delivered. Returns the customer, subscription and
        first subscription item ids.
        """
        with self.state.lock:
            ctx = Ctx(self.state, None, "req_checkout_helper")
            result = complete_checkout(ctx, session_id, test_clock)
        self._webhooks.wait()
        return result

    def seed_customers(
        self, count: int, *, price: str | None = None, stripe_version: str | None = None
    ) -> list[tuple[str, str | None]]:
        """Create `count` customers in one call, each subscribed to `price` when given: a bulk
        fixture for throughput runs (100,000 targets without 200,000 HTTP requests).

        Objects are made by the same code the API routes run (events emitted, first invoices
        finalized); `stripe_version` matters for legacy metered prices, as on the API. Returns
        (customer id, first subscription item id or None) per customer.
        """
        # Imported here: the subscription module pulls in billing, which the handle need not load.
        from ._resources import create_customer
        from ._subscriptions import create_subscription_obj

        out: list[tuple[str, str | None]] = []
        with self.state.lock:
            ctx = Ctx(self.state, stripe_version, "req_seed_helper")
            for _ in range(count):
                customer = create_customer(ctx, {}, ())
                item: str | None = None
                if price is not None:
                    sub = create_subscription_obj(
                        ctx, {"customer": customer["id"], "items": [{"price": price}]}
                    )
                    item = sub["_item_ids"][0]
                out.append((customer["id"], item))
        return out

    # -- inspection -------------------------------------------------------------------------------

    def usage_record_total(self, subscription_item: str, *, period_start: int | None = None) -> int:
        """Usage records accepted for an item: every period if `period_start` is None, else the
        period starting there (by the price's `aggregate_usage`)."""
        with self.state.lock:
            records = self.state.usage.get(subscription_item, {})
            if period_start is None:
                return sum(records.values())
            item = self.state.items.get(subscription_item)
            periods = self.state.item_periods.get(subscription_item, [])
            ends = {start: end for start, end, _ in periods}
            if item is not None:
                ends[item["current_period_start"]] = item["current_period_end"]
                if period_start in ends:
                    return usage_quantity(self.state, item, period_start, ends[period_start])
            end = ends.get(period_start)
            return sum(q for ts, q in records.items() if ts >= period_start and (end is None or ts < end))

    def meter_event_total(
        self, customer: str, event_name: str, *, start: int | None = None, end: int | None = None
    ) -> int:
        """Sum of accepted, uncanceled event values (v1 and v2) with `start <= timestamp < end`."""
        with self.state.lock:
            events = self.state.events_by_key.get((customer, event_name), [])
            total = sum(
                (
                    e.value
                    for e in events
                    if not e.canceled
                    and (start is None or e.timestamp >= start)
                    and (end is None or e.timestamp < end)
                ),
                Decimal(0),
            )
        return int(total)

    def meter_events(self, customer: str | None = None) -> list[dict[str, Any]]:
        """Accepted meter events (identifier, event_name, customer, payload, value, timestamp,
        source "v1"/"v2", canceled), oldest first."""
        with self.state.lock:
            found: list[MeterEvent] = [
                e
                for (cust, _), events in self.state.events_by_key.items()
                if customer is None or cust == customer
                for e in events
            ]
            return [e.as_dict() for e in sorted(found, key=lambda e: e.created)]

    def meter_event_errors(self) -> list[dict[str, Any]]:
        """v2 stream events and adjustments Stripe would reject asynchronously, with their code."""
        with self.state.lock:
            return [dict(e) for e in self.state.meter_event_errors]

    @property
    def idempotency_conflicts(self) -> int:
        """How many 400 `idempotency_error`s were returned."""
        with self.state.lock:
            return self.state.idempotency_conflicts

    def requests(self, operation: str | None = None) -> list[RequestRecord]:
        """The request log (operation, method, path, params, idempotency key, status, ...)."""
        with self.state.lock:
            return [r for r in self.state.log if operation is None or r.operation == operation]

    def events(self, type: str | None = None) -> list[dict[str, Any]]:
        """Stripe events generated so far (what webhooks carry), oldest first."""
        with self.state.lock:
            return [e for e in self.state.events if type is None or e["type"] == type]

    def invoices(self, subscription: str | None = None) -> list[dict[str, Any]]:
        """Finalized invoices, oldest first."""
        with self.state.lock:
            return [
                i
                for i in self.state.invoices.values()
                if subscription is None or i["subscription"] == subscription
            ]


class EmulatorHTTPXClient(stripe.HTTPXClient):
    """`stripe.HTTPXClient` for sync and async use that is quiet under warnings-as-errors.

    Sync requests keep a pooled connection (close it with `close()`); async requests use a fresh
    connection each, so no socket outlives the event loop of an async test.
    """

    def __init__(self, timeout: float = 30.0, *, keepalive: bool = False) -> None:
        import httpx

        super().__init__(timeout=timeout, allow_sync_methods=True)
        limits = httpx.Limits(max_keepalive_connections=64 if keepalive else 0)
        self._client_async = httpx.AsyncClient(limits=limits, timeout=timeout)

    def _get_request_args_kwargs(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any
    ) -> list[Any]:
        # The SDK hands httpx its encoded body as `data=`, which httpx deprecates (a warning that
        # test suites running with warnings as errors turn into a failed request); `content=`
        # sends the same bytes.
        args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
        body = kwargs.pop("data", None)
        if body:
            kwargs["content"] = body
        return [args, kwargs]

    def release_connections(self) -> None:
        """Close idle pooled sockets and stay usable (httpx has no public call for this)."""
        pool = getattr(getattr(self._client, "_transport", None), "_pool", None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        """Close the sync connection pool (async requests hold none unless `keepalive`)."""
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        """Close the async connection pool, from the event loop that used it."""
        await self._client_async.aclose()
