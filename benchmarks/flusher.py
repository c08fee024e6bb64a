"""Delivery throughput against the local Stripe emulator, rate limiting off: lines/s per sink.

Run: ``python benchmarks/flusher.py --targets 10000`` (starts its own redis-server and emulator).
"""

from __future__ import annotations

import argparse
import time

import anyio
import redis.asyncio as aioredis

from metered_middleware._delivery_config import SINKS, DeliverySettings, SinkName
from metered_middleware._flusher import Flusher
from metered_middleware._layout import Layout
from metered_middleware._redis_server import RedisServer
from metered_middleware._store import CountStore, CountWrite
from metered_middleware._target import BillingTarget
from metered_middleware.testing.emulator import StripeEmulator


async def one_sink(sink: SinkName, emu: StripeEmulator, url: str, targets: int, concurrency: int) -> float:
    redis = aioredis.Redis.from_url(url)
    await redis.flushdb()
    emu.reset()
    legacy = sink == "usage_records"
    client = emu.client(stripe_version="2025-02-24.acacia") if legacy else emu.client()
    meter = client.v1.billing.meters.create(
        {"display_name": "b", "event_name": "api_requests", "default_aggregation": {"formula": "sum"}}
    )
    recurring: dict[str, str] = {"interval": "month", "usage_type": "metered"}
    if not legacy:
        recurring["meter"] = meter.id
    params: dict[str, object] = {"currency": "usd", "unit_amount": 1, "recurring": recurring}
    params["product_data"] = {"name": "b"}
    price = client.v1.prices.create(params)  # type: ignore[arg-type]
    customer = client.v1.customers.create({})
    layout = Layout("mm", 4)
    lines: dict[int, list[tuple[BillingTarget, int]]] = {}
    item = ""
    if legacy:
        sub = client.v1.subscriptions.create({"customer": customer.id, "items": [{"price": price.id}]})
        item = sub["items"]["data"][0]["id"]
    for i in range(targets):
        # Distinct targets without 10k setup calls: usage records vary the customer part of the target id
        # (the request only carries the real item); meter events vary the item part (they carry the customer).
        if legacy:
            target = BillingTarget(customer=f"cus_bench{i}", subscription_item=item)
        else:
            target = BillingTarget(
                customer=customer.id, subscription_item=f"si_b{i}", meter_event_name="api_requests"
            )
        lines.setdefault(layout.shard_of(target.target_id), []).append((target, 1))
    await CountStore(redis, layout).apply([CountWrite(s, "bench", 1, ls) for s, ls in lines.items()])
    settings = DeliverySettings(
        stripe_api_key="sk_test_bench",
        redis_url=url,
        sink=sink,
        meter_event_name="api_requests",
        api_base=emu.url,
        rate_limit=0,
        max_concurrency=concurrency,
        batch_size=1000,
    )
    started = time.perf_counter()
    async with Flusher(settings) as flusher:
        report = await flusher.flush_once()
    elapsed = time.perf_counter() - started
    await redis.aclose()
    emu.close_clients()
    sent = report.delivered + report.dead
    print(
        f"{sink:20s} {sent:6d} lines in {elapsed:6.2f}s = {sent / elapsed:8.0f} lines/s (dead {report.dead})"
    )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sink", choices=SINKS, action="append")
    args = parser.parse_args()
    with RedisServer() as server, StripeEmulator(rate_limit=None) as emu:
        for sink in args.sink or SINKS:  # argparse choices keep it a SinkName
            anyio.run(one_sink, sink, emu, server.url, args.targets, args.concurrency)


if __name__ == "__main__":
    main()
