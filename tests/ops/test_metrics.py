"""The Prometheus endpoint, scraped during a run: its numbers are what happened."""

from __future__ import annotations

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from metered_middleware import KeyRegistry, MeteringMiddleware, RouteWeight
from metered_middleware._flusher import Flusher
from metered_middleware._metrics import MeteringMetrics, metrics_app
from metered_middleware._sinks import make_sink, make_stripe_client
from tests.helpers import make_app

from .conftest import SHARDS, Billing

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def test_scrape_during_run_matches_requests_counts_and_deliveries(
    billing: Billing, redis_client: aioredis.Redis
) -> None:
    """Requests, refusals by code, units, pending per shard and deliveries per sink read as they happened."""
    targets = [billing.subscribe(f"m{i}") for i in range(3)]
    registry = KeyRegistry(redis_client)
    keys = [(await registry.create(t)).key for t in targets]
    metered = MeteringMiddleware(
        make_app(),
        redis=redis_client,
        environ={},
        shards=SHARDS,
        coalesce_window=0.05,
        route_weights=(RouteWeight("GET", "/v1/fonts/*/subset", 5),),
    )
    metrics = MeteringMetrics(middleware=metered)
    endpoint = metrics_app(metrics)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as api,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=endpoint), base_url="http://t") as ops,
    ):
        for i in range(12):
            path = "/v1/fonts/a/subset" if i % 4 == 0 else "/v1/hello"
            assert (await api.get(path, headers={"X-API-Key": keys[i % 3]})).status_code == 200
        for _ in range(3):
            assert (await api.get("/v1/hello", headers={"X-API-Key": "mk_" + "x" * 40})).status_code == 401
        assert (await api.get("/v1/hello")).status_code == 401
        assert (await api.get("/v1/status/500", headers={"X-API-Key": keys[0]})).status_code == 500

        during = await scrape(ops)
        assert total(during, "metered_requests_total") == 12
        assert total(during, "metered_rejections_total", code="api_key_invalid") == 3
        assert total(during, "metered_rejections_total", code="api_key_missing") == 1
        assert total(during, "metered_units_counted_total") == 3 * 5 + 9
        # Each key, the unknown one too, was looked up once; the cache answered the other requests.
        assert total(during, "metered_key_lookups_total") == 4
        assert total(during, "metered_key_lookups_stale_total") == 0
        await metered.flush()
        flushed = await scrape(ops)
        assert total(flushed, "metered_units_written_total") == 24
        assert total(flushed, "metered_buffer_units") == 0
        assert total(flushed, "metered_pending_units") == 24
        for target in targets:
            shard = str(billing.layout.shard_of(target.target_id))
            assert total(flushed, "metered_pending_units", shard=shard) > 0
            assert total(flushed, "metered_pending_age_seconds", shard=shard) >= 0

        settings = billing.settings()
        client, http_client = make_stripe_client(settings)
        sink = metrics.measure(make_sink(settings, client))
        metrics.redis, metrics.layout = redis_client, billing.layout
        async with Flusher(settings, client=client, sink=sink) as flusher:
            report = await flusher.flush_once()
        await http_client.close_async()  # type: ignore[no-untyped-call]
        assert report.complete, report
        after = await scrape(ops)
    await metered.aclose()
    sink_name = billing.sink
    assert total(after, "metered_delivery_lines_total", sink=sink_name, outcome="delivered") == 3
    assert total(after, "metered_delivery_units_total", sink=sink_name, outcome="delivered") == 24
    assert total(after, "metered_delivery_lines_total", outcome="dead") == 0
    assert total(after, "metered_stripe_request_seconds_count", sink=sink_name) == total(
        after, "metered_delivery_batches_total", sink=sink_name
    )
    assert total(after, "metered_pending_units") == 0
    assert total(after, "metered_batches_in_flight") == 0
    assert total(after, "metered_lease_held") == 0  # the flusher released its leases on exit


async def test_cache_renewals_and_lookups_after_expiry_are_counted(
    billing: Billing, redis_client: aioredis.Redis
) -> None:
    """An expired entry kept because nothing changed in the registry counts as a renewal, not a lookup; a
    revocation moves the registry's change count, so the next expiry looks the key up (and refuses it)."""
    registry = KeyRegistry(redis_client)
    key = (await registry.create(billing.subscribe("renew"))).key
    metered = MeteringMiddleware(make_app(), redis=redis_client, environ={}, shards=SHARDS, cache_ttl=0.4)
    endpoint = metrics_app(MeteringMetrics(middleware=metered))
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as api,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=endpoint), base_url="http://t") as ops,
    ):
        assert (await api.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
        await anyio.sleep(0.6)  # past the TTL, and past the change count's own age limit (ttl / 2)
        assert (await api.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
        renewed = await scrape(ops)
        assert total(renewed, "metered_key_lookups_total") == 1
        assert total(renewed, "metered_key_cache_renewals_total") == 1

        await registry.revoke(key)
        await anyio.sleep(0.6)
        refused = await api.get("/v1/hello", headers={"X-API-Key": key})
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "api_key_revoked")
        revoked = await scrape(ops)
        assert total(revoked, "metered_key_lookups_total") == 2
        assert total(revoked, "metered_key_cache_renewals_total") == 1
    await metered.aclose()


async def test_stripe_errors_and_retries_are_counted_by_type(
    billing: Billing, redis_client: aioredis.Redis
) -> None:
    """A Stripe 500 counts as a retried line and an error of its type; the retry then counts as delivered."""
    target = billing.subscribe("flaky")
    await billing.count(redis_client, [(target, 3)])
    billing.emu.inject(f"{billing.sink}.create", "500", times=1)
    metrics = MeteringMetrics(redis=redis_client, layout=billing.layout)
    settings = billing.settings()
    client, http_client = make_stripe_client(settings)
    async with Flusher(settings, client=client, sink=metrics.measure(make_sink(settings, client))) as flusher:
        report = await flusher.flush_once()
    await http_client.close_async()  # type: ignore[no-untyped-call]
    assert report.complete, report
    await metrics.refresh()
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert total(samples, "metered_delivery_lines_total", outcome="retry") == 1
    assert total(samples, "metered_delivery_lines_total", outcome="delivered") == 1
    assert total(samples, "metered_delivery_units_total", outcome="delivered") == 3
    assert total(samples, "metered_stripe_errors_total", sink=billing.sink, type="APIError") == 1
    assert total(samples, "metered_stripe_request_seconds_count") == 2
