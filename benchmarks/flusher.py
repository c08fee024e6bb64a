"""Delivery throughput against the local Stripe emulator, rate limiting off: lines/s per sink.

Run: ``python benchmarks/flusher.py --targets 10000`` (starts its own redis-server and emulator).

Every pending line is a distinct billing target with its own customer (and, for usage records, its own
subscription item), so the flusher's "one call in flight per customer and meter" rule does not serialise
them, as it would not for real traffic spread over many customers. The emulator runs in a separate process
(this script re-run with ``--serve-emulator``), so it does not share the flusher's GIL; its customers and
subscriptions are made in bulk there with ``StripeEmulator.seed_customers`` (100,000 targets without
200,000 setup requests). The flusher runs in this process. ``--repeat N`` runs each sink N times and prints
the median; ``--seconds S`` stops each run after S seconds and counts what was delivered by then. Each sink
is measured through each HTTP client (``--http-client httpx|aiohttp`` picks one; aiohttp is what ``auto``,
the default, picks on asyncio).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import redis.asyncio as aioredis

from metered_middleware._delivery_config import (
    HTTP_CLIENTS,
    SINKS,
    DeliverySettings,
    HTTPClientName,
    SinkName,
)
from metered_middleware._flusher import Flusher
from metered_middleware._layout import Layout
from metered_middleware._redis_server import RedisServer
from metered_middleware._store import CountStore, CountWrite
from metered_middleware._target import BillingTarget
from metered_middleware.testing.emulator import StripeEmulator

LEGACY_VERSION = "2025-02-24.acacia"
EVENT_NAME = "api_requests"
SHARDS = 4


def serve_emulator(sink: str, targets: int, out: str) -> None:
    """Child process: an emulator with `targets` customers (subscribed for usage records), until SIGTERM."""
    legacy = sink == "usage_records"
    emu = StripeEmulator(rate_limit=None).start()
    client = emu.client(stripe_version=LEGACY_VERSION) if legacy else emu.client()
    meter = client.v1.billing.meters.create(
        {"display_name": "b", "event_name": EVENT_NAME, "default_aggregation": {"formula": "sum"}}
    )
    recurring: dict[str, str] = {"interval": "month", "usage_type": "metered"}
    if not legacy:
        recurring["meter"] = meter.id
    params: dict[str, object] = {"currency": "usd", "unit_amount": 1, "recurring": recurring}
    params["product_data"] = {"name": "b"}
    price = client.v1.prices.create(params)  # type: ignore[arg-type]
    seeded = emu.seed_customers(
        targets, price=price.id if legacy else None, stripe_version=LEGACY_VERSION if legacy else None
    )
    Path(out).write_text(json.dumps({"url": emu.url, "targets": seeded}))
    print("ready", flush=True)
    stopped = False

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopped:
        time.sleep(0.2)
    emu.stop()


async def one_run(
    sink: SinkName,
    url: str,
    emu_url: str,
    seeded: list[list[str | None]],
    concurrency: int,
    seconds: float,
    http_client: HTTPClientName,
) -> tuple[int, float, int, float]:
    """Count one unit for every seeded target, then time the flusher delivering them.

    Returns (lines, seconds, dead, CPU seconds this process spent delivering): the CPU per line is the
    figure that holds on a shared machine, where lines/s moves with the other load.
    """
    redis = aioredis.Redis.from_url(url)
    await redis.flushdb()
    layout = Layout("mm", SHARDS)
    lines: dict[int, list[tuple[BillingTarget, int]]] = {}
    for customer, item in seeded:
        assert customer is not None
        target = BillingTarget(customer=customer, subscription_item=item, meter_event_name=EVENT_NAME)
        lines.setdefault(layout.shard_of(target.target_id), []).append((target, 1))
    await CountStore(redis, layout).apply([CountWrite(s, "bench", 1, ls) for s, ls in lines.items()])
    settings = DeliverySettings(
        stripe_api_key="sk_test_bench",
        redis_url=url,
        shards=SHARDS,
        sink=sink,
        meter_event_name=EVENT_NAME,
        api_base=emu_url,
        rate_limit=0,
        max_concurrency=concurrency,
        batch_size=1000,
        http_client=http_client,
    )
    dead = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    async with Flusher(settings) as flusher:
        with anyio.move_on_after(seconds or None):
            dead = (await flusher.flush_once()).dead
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    # Lines acknowledged by now (each target carries one unit), also when the run was cut short.
    sent = sum([await redis.hlen(layout.delivered(s)) for s in range(SHARDS)]) + dead
    await redis.aclose()
    return sent, elapsed, dead, cpu


def bench_sink(
    sink: SinkName,
    url: str,
    targets: int,
    concurrency: int,
    repeat: int,
    seconds: float,
    uvloop: bool = False,
    http_client: HTTPClientName = "httpx",
) -> float:
    rates: list[float] = []
    cpus: list[float] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "emulator.json")
            command = [
                sys.executable,
                __file__,
                "--serve-emulator",
                out,
                "--sink",
                sink,
                "--targets",
                str(targets),
            ]
            child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout is not None
                if child.stdout.readline().strip() != "ready":
                    raise SystemExit(f"the emulator process failed to start (exit {child.wait()})")
                fixture = json.loads(Path(out).read_text())
                sent, elapsed, dead, cpu = anyio.run(
                    one_run,
                    sink,
                    url,
                    fixture["url"],
                    fixture["targets"],
                    concurrency,
                    seconds,
                    http_client,
                    backend_options={"use_uvloop": uvloop},
                )
            finally:
                child.terminate()
                child.wait(timeout=30)
        rate = sent / elapsed
        rates.append(rate)
        cpus.append(cpu * 1e3 / max(1, sent))
        print(
            f"{sink:20s} {http_client:7s} {sent:6d} lines in {elapsed:6.2f}s = {rate:8.0f} lines/s"
            f" (dead {dead}), flusher CPU {cpus[-1]:.3f} ms/line",
            flush=True,
        )
    median = statistics.median(rates)
    if repeat > 1:
        print(
            f"{sink:20s} {http_client:7s} median of {repeat}: {median:8.0f} lines/s,"
            f" flusher CPU {statistics.median(cpus):.3f} ms/line",
            flush=True,
        )
    return median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=10_000, help="distinct pending targets (10000)")
    parser.add_argument("--concurrency", type=int, default=16, help="flusher max_concurrency (16)")
    parser.add_argument("--sink", choices=SINKS, action="append", help="sink to measure (all by default)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per sink; the median is printed (1)")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop each run after this long (no limit)")
    parser.add_argument("--uvloop", action="store_true", help="run the flusher on uvloop (asyncio's loop)")
    parser.add_argument(
        "--http-client",
        choices=HTTP_CLIENTS,
        action="append",
        help="the flusher's transport to Stripe, METERED_HTTP_CLIENT (each by default)",
    )
    parser.add_argument("--serve-emulator", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_emulator:
        serve_emulator(args.sink[0], args.targets, args.serve_emulator)
        return
    with RedisServer() as server:
        for sink in args.sink or SINKS:  # argparse choices keep it a SinkName
            for http_client in args.http_client or HTTP_CLIENTS:
                bench_sink(
                    sink,
                    server.url,
                    args.targets,
                    args.concurrency,
                    args.repeat,
                    args.seconds,
                    args.uvloop,
                    http_client,
                )


if __name__ == "__main__":
    main()
