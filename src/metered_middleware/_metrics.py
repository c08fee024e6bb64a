"""Prometheus metrics (needs ``prometheus-client``): read from the stats the library keeps anyway.

Nothing here runs on the request path. The middleware and the counter keep plain integers; a custom
collector turns them into metrics at scrape time. Shard gauges (pending units and age, batches in flight,
lease holders, dead-letter size) come from Redis, refreshed by ``MeteringMetrics.refresh()`` (the ASGI
endpoint refreshes before every scrape; the flusher's ``--metrics-port`` server refreshes in the background).
Delivery counters come from ``MeasuredSink``, a wrapper around the flusher's sink that times every Stripe call
and counts its outcomes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as aioredis

from metered_middleware._errors import MeteringError, StorageError
from metered_middleware._inspect import ShardStatus, read_shards
from metered_middleware._layout import Layout

try:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("metrics need prometheus-client: pip install prometheus-client") from exc

if TYPE_CHECKING:
    from metered_middleware._delivery_config import DeliverySettings
    from metered_middleware._middleware import MeteringMiddleware
    from metered_middleware._sinks import Outcome, SendLine, Sink

__all__ = ["MeasuredSink", "MeteringMetrics", "metrics_app", "run_with_metrics"]

log = logging.getLogger("metered_middleware.metrics")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_OUTCOMES = ("delivered", "retry", "dead", "restamp")


class _DeliveryCounts:
    """Plain counters a ``MeasuredSink`` adds to; one instance per sink name."""

    __slots__ = ("errors", "lines", "requests", "units")

    def __init__(self) -> None:
        self.requests: dict[str, int] = dict.fromkeys(_OUTCOMES, 0)
        self.lines: dict[str, int] = dict.fromkeys(_OUTCOMES, 0)
        self.units: dict[str, int] = dict.fromkeys(_OUTCOMES, 0)
        self.errors: dict[str, int] = {}


class MeasuredSink:
    """A ``Sink`` that times each Stripe call and counts lines by outcome, then delegates.

    A request's outcome is its worst line's: ``dead`` over ``restamp`` over ``retry`` over ``delivered``.
    """

    def __init__(self, sink: Sink, metrics: MeteringMetrics) -> None:
        self.inner = sink
        self.name = sink.name
        self.batch_limit = sink.batch_limit
        self._counts = metrics.delivery_counts(sink.name)
        self._latency = metrics.stripe_latency.labels(sink=sink.name)

    def lock_key(self, line: SendLine) -> str:
        """The wrapped sink's lock key."""
        return self.inner.lock_key(line)

    async def send(self, lines: Sequence[SendLine]) -> list[Outcome]:
        """Send through the wrapped sink, timing the call and counting what Stripe answered."""
        started = time.perf_counter()
        outcomes = await self.inner.send(lines)
        self._latency.observe(time.perf_counter() - started)
        counts = self._counts
        worst = "delivered"
        for line, outcome in zip(lines, outcomes, strict=True):
            counts.lines[outcome.kind] += 1
            counts.units[outcome.kind] += line.units
            if outcome.kind != "delivered":
                kind = str(outcome.error.get("type") or outcome.reason or "unknown")
                counts.errors[kind] = counts.errors.get(kind, 0) + 1
            if _OUTCOMES.index(outcome.kind) > _OUTCOMES.index(worst):
                worst = outcome.kind
        counts.requests[worst] += 1
        return outcomes


class MeteringMetrics(Collector):
    """Every metric of the library in one ``CollectorRegistry``.

    ``middleware`` adds request, counting and buffer metrics; ``redis`` and ``layout`` add per-shard gauges
    (after ``refresh()``); ``MeasuredSink(sink, metrics)`` adds delivery metrics. Names start with
    ``metered_``.
    """

    def __init__(
        self,
        *,
        middleware: MeteringMiddleware | None = None,
        redis: aioredis.Redis | None = None,
        layout: Layout | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.middleware = middleware
        self.redis = redis if redis is not None or middleware is None else middleware.redis
        self.layout = layout if layout is not None or middleware is None else middleware.layout
        self.registry = registry if registry is not None else CollectorRegistry()
        self.shards: list[ShardStatus] = []
        self.refresh_errors = 0
        self._delivery: dict[str, _DeliveryCounts] = {}
        self.stripe_latency = Histogram(
            "metered_stripe_request_seconds",
            "Time a Stripe call took, per sink (retries are separate calls).",
            ["sink"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.registry.register(self)

    def delivery_counts(self, sink: str) -> _DeliveryCounts:
        """The counters of one sink (created on first use)."""
        return self._delivery.setdefault(sink, _DeliveryCounts())

    def measure(self, sink: Sink) -> MeasuredSink:
        """Wrap a sink so its calls are measured here."""
        return MeasuredSink(sink, self)

    async def refresh(self) -> None:
        """Read every shard's state from Redis for the next scrape; a failure keeps the last reading."""
        if self.redis is None or self.layout is None:
            return
        try:
            self.shards = await read_shards(self.redis, self.layout)
        except StorageError as exc:
            self.refresh_errors += 1
            log.warning("metrics: %s", exc)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    # -- the collector -----------------------------------------------------------------------------
    def describe(self) -> Iterable[Any]:
        """Nothing up front: families depend on what is attached, so the registry asks ``collect()``."""
        return []

    def collect(self) -> Iterable[Any]:
        """Build the families from the current stats (called at scrape time)."""
        if self.middleware is not None:
            yield from self._middleware_families(self.middleware)
        if self.layout is not None and self.redis is not None:
            yield from self._shard_families()
        if self._delivery:
            yield from self._delivery_families()

    def _middleware_families(self, mw: MeteringMiddleware) -> Iterable[Any]:
        stats = mw.counter.stats
        yield CounterMetricFamily(
            "metered_requests", "Requests counted (admitted with a counting status).", stats.counted_requests
        )
        rejected = CounterMetricFamily(
            "metered_rejections", "Requests refused, by error code.", labels=["code"]
        )
        for code, n in sorted(mw.rejected.items()):
            rejected.add_metric([code], n)
        yield rejected
        yield CounterMetricFamily(
            "metered_key_lookups",
            "Keys looked up in the registry (cache misses and expiries; a hit costs none).",
            mw.resolver.lookups,
        )
        yield CounterMetricFamily(
            "metered_key_cache_renewals",
            "Expired cache entries kept for another TTL without a lookup: the registry's change count had "
            "not moved since the entry was read.",
            mw.resolver.renewed,
        )
        yield CounterMetricFamily(
            "metered_key_lookups_stale",
            "Failed lookups answered with the key's expired cache entry.",
            mw.resolver.stale_served,
        )
        yield CounterMetricFamily("metered_units_counted", "Units counted in process.", stats.counted_units)
        yield CounterMetricFamily("metered_units_written", "Units Redis acknowledged.", stats.written_units)
        yield CounterMetricFamily(
            "metered_units_overflow", "Units dropped because the buffer was full.", stats.overflow_units
        )
        yield CounterMetricFamily("metered_count_writes", "Count writes Redis applied.", stats.writes)
        yield CounterMetricFamily(
            "metered_count_write_errors", "Count writes that failed.", stats.write_errors
        )
        yield GaugeMetricFamily(
            "metered_buffer_units", "Units counted in process, not yet in Redis.", stats.buffered_units
        )
        yield GaugeMetricFamily(
            "metered_redis_healthy", "1 while Redis accepts count writes.", int(mw.counter.healthy)
        )

    def _shard_families(self) -> Iterable[Any]:
        families = {
            "pending": GaugeMetricFamily(
                "metered_pending_units", "Units counted, not yet claimed, per shard.", labels=["shard"]
            ),
            "age": GaugeMetricFamily(
                "metered_pending_age_seconds",
                "Age of the oldest undelivered units (pending or claimed) per shard.",
                labels=["shard"],
            ),
            "batches": GaugeMetricFamily(
                "metered_batches_in_flight", "Claimed batches not yet fully delivered.", labels=["shard"]
            ),
            "claimed": GaugeMetricFamily(
                "metered_claimed_units", "Units in claimed batches, per shard.", labels=["shard"]
            ),
            "dead": GaugeMetricFamily(
                "metered_dead_letter_lines", "Lines in the dead-letter, per shard.", labels=["shard"]
            ),
            "dead_units": GaugeMetricFamily(
                "metered_dead_letter_units", "Units in the dead-letter, per shard.", labels=["shard"]
            ),
            "lease": GaugeMetricFamily(
                "metered_lease_held", "1 for the flusher holding a shard's lease.", labels=["shard", "owner"]
            ),
        }
        for s in self.shards:
            shard = str(s.shard)
            families["pending"].add_metric([shard], s.pending_units)
            ages = [a for a in (s.pending_age, s.oldest_batch_age) if a is not None]
            families["age"].add_metric([shard], max(ages, default=0.0))
            families["batches"].add_metric([shard], s.batches)
            families["claimed"].add_metric([shard], s.claimed_units)
            families["dead"].add_metric([shard], s.dead_letters)
            families["dead_units"].add_metric([shard], s.dead_units)
            if s.lease_holder:
                families["lease"].add_metric([shard, s.lease_holder], 1)
        yield from families.values()
        yield CounterMetricFamily(
            "metered_status_refresh_errors", "Failed reads of shard state from Redis.", self.refresh_errors
        )

    def _delivery_families(self) -> Iterable[Any]:
        batches = CounterMetricFamily(
            "metered_delivery_batches",
            "Stripe requests by sink and outcome (a stream request carries up to 100 lines).",
            labels=["sink", "outcome"],
        )
        lines = CounterMetricFamily(
            "metered_delivery_lines", "Lines by sink and Stripe's outcome.", labels=["sink", "outcome"]
        )
        units = CounterMetricFamily(
            "metered_delivery_units", "Units by sink and Stripe's outcome.", labels=["sink", "outcome"]
        )
        errors = CounterMetricFamily(
            "metered_stripe_errors", "Lines Stripe did not accept, by error type.", labels=["sink", "type"]
        )
        for sink, counts in sorted(self._delivery.items()):
            for outcome in _OUTCOMES:
                batches.add_metric([sink, outcome], counts.requests[outcome])
                lines.add_metric([sink, outcome], counts.lines[outcome])
                units.add_metric([sink, outcome], counts.units[outcome])
            for kind, n in sorted(counts.errors.items()):
                errors.add_metric([sink, kind], n)
        yield from (batches, lines, units, errors)


def metrics_app(
    metrics: MeteringMetrics | MeteringMiddleware,
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app answering every GET with the metrics (mount it, e.g. at ``/metrics``).

    Given a middleware, it builds ``MeteringMetrics(middleware=...)``. Shard gauges are read from Redis
    before each scrape.
    """
    if not isinstance(metrics, MeteringMetrics):
        metrics = MeteringMetrics(middleware=metrics)
    collector = metrics

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise MeteringError("the metrics endpoint only answers HTTP")
        await collector.refresh()
        body = collector.exposition()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"cache-control", b"no-store")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    app.metrics = collector  # type: ignore[attr-defined]
    return app


async def run_with_metrics(
    settings: DeliverySettings,
    port: int,
    host: str,
    run: Callable[..., Awaitable[int]],
    *,
    refresh_every: float = 1.0,
) -> int:
    """Serve the flusher's metrics on ``host:port`` while ``run(client=..., sink=...)`` delivers.

    ``run`` receives the Stripe client and a measured sink to hand to its ``Flusher``. Shard gauges are
    refreshed every ``refresh_every`` seconds; the HTTP server runs in a thread and stops with ``run``.
    """
    from prometheus_client import start_http_server

    from metered_middleware._redis import connect
    from metered_middleware._sinks import make_sink, make_stripe_client

    redis = connect(settings.redis_url)
    metrics = MeteringMetrics(redis=redis, layout=Layout(settings.namespace, settings.shards))
    client, http = make_stripe_client(settings)
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%s/metrics", host, port)
    try:
        async with anyio.create_task_group() as tg:

            async def refresh() -> None:
                while True:
                    await metrics.refresh()
                    await anyio.sleep(refresh_every)

            tg.start_soon(refresh)
            code = await run(client=client, sink=metrics.measure(make_sink(settings, client)))
            tg.cancel_scope.cancel()
        return code
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        await redis.aclose()
        close: Callable[[], Awaitable[Any]] = http.close_async  # the SDK leaves it untyped
        await close()
