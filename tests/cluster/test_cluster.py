"""Redis Cluster: counting, the key registry and delivery across app and flusher processes stay exact."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import redis.asyncio as aioredis

from metered_middleware import BillingTarget, KeyRegistry, MeteringMiddleware
from metered_middleware._delivery import DeliveryStore
from metered_middleware._flusher import Flusher
from metered_middleware._inspect import read_shards, target_usage
from metered_middleware._layout import Layout
from metered_middleware._store import CountStore
from metered_middleware.testing.cluster import LocalCluster
from metered_middleware.testing.emulator import StripeEmulator
from tests.helpers import make_app, pending_totals
from tests.ops.conftest import EVENT, Billing

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


async def test_shards_spread_over_masters_and_count_exactly(
    cluster: LocalCluster, cluster_client: aioredis.Redis
) -> None:
    """With 8 shards every master holds some; counts, the registry and status work as on one Redis."""
    layout = Layout("mm", 8)
    masters = {n.port for n in cluster.nodes() if n.role == "master"}
    assert {cluster.master_of(layout.pending(s)) for s in range(8)} == masters
    registry = KeyRegistry(cluster_client)
    targets = [BillingTarget(customer=f"cus_{i}", period_start=1, period_end=2**31) for i in range(16)]
    keys = [(await registry.create(t)).key for t in targets]
    assert len(await registry.list()) == 16
    # A revocation spans slots here, so no change count is kept (caches read entries again at expiry).
    revoked = await registry.revoke((await registry.create(targets[0])).key)
    assert revoked is not None
    assert revoked.target.revoked
    assert await registry.changes() is None
    metered = MeteringMiddleware(make_app(), redis=cluster_client, environ={}, shards=8)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as http:
        for i in range(64):
            assert (await http.get("/v1/hello", headers={"X-API-Key": keys[i % 16]})).status_code == 200
    await metered.aclose()
    assert metered.counter.stats.write_errors == 0
    assert await pending_totals(cluster_client, layout) == {t.target_id: 4 for t in targets}
    assert sum(s.pending_units for s in await read_shards(cluster_client, layout)) == 64
    # Usage reads add a target's bucket and the unbucketed hash in one pipeline, on the target's master.
    store = CountStore(cluster_client, layout)
    assert [await store.period_usage(t) for t in targets] == [4] * 16
    assert (await target_usage(cluster_client, layout, targets[0].target_id)).counted == 4


async def _app_instance(url: str, keys: list[str], clients: int, requests: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.load_instance",
        url,
        str(clients),
        str(requests),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate("\n".join(keys).encode())
    assert proc.returncode == 0
    return int(out)


async def test_four_apps_three_flushers_one_killed_bill_exactly(
    cluster: LocalCluster, cluster_client: aioredis.Redis, stripe_emulator: StripeEmulator
) -> None:
    """4 app processes and 3 flusher processes on a 3-master cluster, one flusher SIGKILLed mid-run:
    Stripe ends with exactly the requests served, per customer, and no idempotency conflict."""
    billing = Billing(stripe_emulator, "meter_events", cluster.url)
    billing.layout = Layout("mm", 4)
    targets = [billing.subscribe(f"k{i}") for i in range(10)]
    registry = KeyRegistry(cluster_client)
    keys = [(await registry.create(t)).key for t in targets]
    env = {
        **os.environ,
        "STRIPE_API_KEY": "sk_test_emulator",
        "METERED_REDIS_URL": cluster.url,
        "METERED_SHARDS": "4",
        "METERED_SINK": "meter_events",
        "METERED_METER_EVENT_NAME": EVENT,
        "METERED_STRIPE_API_BASE": stripe_emulator.url,
        "METERED_RATE_LIMIT": "off",
        "METERED_FLUSH_INTERVAL": "0.1",
        "METERED_LEASE_TTL": "1",
        "METERED_RETRY_BACKOFF": "0.01",
    }
    flushers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "metered_middleware._cli_flush", "flush", env=env
        )
        for _ in range(3)
    ]
    try:
        apps = asyncio.gather(*(_app_instance(cluster.url, keys, 10, 40) for _ in range(4)))
        await asyncio.sleep(1.5)
        flushers[0].kill()  # SIGKILL: its leases expire, its claimed batches are finished by the others
        served = await apps
    finally:
        for proc in flushers[1:]:
            proc.terminate()  # SIGTERM: a graceful stop with a final flush
        codes = [await proc.wait() for proc in flushers]
    assert served == [400] * 4
    assert codes[0] == -9
    assert codes[1:] == [0, 0]
    # Whatever the killed flusher held is finished by one last pass once its leases have expired.
    async with Flusher(billing.settings(shards=4, lease_ttl=1.0)) as last:
        report = await last.flush_once()
    assert report.complete, report
    # Each of 10 clients sends request i with key (n + i) % 10: 10 x 40 / 10 = 40 per key per instance.
    for target in targets:
        assert stripe_emulator.meter_event_total(target.customer, EVENT) == 160, target.customer
    assert stripe_emulator.idempotency_conflicts == 0
    totals = await DeliveryStore(cluster_client, billing.layout).totals()
    assert totals["delivered"] == {t.target_id: 160 for t in targets}
    assert not any(totals["pending"].values())
    assert not any(totals["claimed"].values())
