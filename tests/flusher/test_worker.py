"""The `metered-middleware flush` worker: Prometheus metrics on --metrics-port, graceful SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from metered_middleware._redis_server import free_port
from metered_middleware.testing.emulator import StripeEmulator

from .conftest import World

pytestmark = pytest.mark.anyio


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_worker_exports_metrics_and_finishes_on_sigterm(
    emulator: StripeEmulator, redis_client: aioredis.Redis, redis_url: str
) -> None:
    """The worker's metrics port shows what it delivered and what is pending; on SIGTERM it delivers what
    is left and exits 0."""
    world = World(emulator, "meter_events", redis_client, redis_url)
    target = world.subscribe("worker")
    await world.count([(target, 7)])
    port = free_port()
    env = {**os.environ, **world.env(METERED_FLUSH_INTERVAL="0.1")}
    proc = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child we signal; waited on in a thread
        [sys.executable, "-m", "metered_middleware._cli_flush", "flush", "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen: tuple[float | None, ...] = ()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            # Shard gauges are refreshed from Redis every second: wait for the scrape that shows it all.
            with anyio.fail_after(30):
                while seen != (7.0, 0.0, 0.0, 0.0):
                    await anyio.sleep(0.1)
                    try:
                        text = (await http.get("/metrics")).text
                    except httpx.TransportError:
                        continue  # not listening yet
                    seen = (
                        _sample(
                            text, "metered_delivery_units_total", sink="meter_events", outcome="delivered"
                        ),
                        _sample(text, "metered_pending_units", shard="0"),
                        _sample(text, "metered_pending_units", shard="1"),
                        _sample(text, "metered_claimed_units", shard="0"),
                    )
        # Counts arriving just before shutdown are delivered by the final flush, not left behind.
        await world.count([(target, 5)])
        proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(lambda: proc.wait(30))
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert code == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    await world.assert_exact()
    assert world.stripe_total(target) == 12


async def test_flush_once_says_why_it_did_not_deliver_everything(world: World) -> None:
    """``flush --once`` exits 1 when a shard stays held by another flusher, and its log names the shard;
    once the shard is free, a rerun delivers it and exits 0 without a warning."""
    world.shards = 2
    targets = [world.subscribe(f"w{i}") for i in range(6)]
    await world.count([(t, 3) for t in targets])
    await world.redis.set(world.layout.lease(1), "99:someone-else", px=60_000)
    env = {**os.environ, **world.env(METERED_LEASE_TTL="0.5")}
    command = [sys.executable, "-m", "metered_middleware._cli_flush", "flush", "--once"]
    held = await anyio.run_process(command, env=env, check=False)
    log = held.stderr.decode()
    assert held.returncode == 1, log
    assert "did not deliver everything: shard 1 skipped (held by another flusher" in log
    assert "Traceback" not in log

    await world.redis.delete(world.layout.lease(1))
    free = await anyio.run_process(command, env=env, check=False)
    assert free.returncode == 0, free.stderr.decode()
    assert "WARNING" not in free.stderr.decode()
    await world.assert_exact()
