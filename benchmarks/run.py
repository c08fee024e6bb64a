"""What metering costs: the same app bare and metered, alternated in one run, compared as medians.

    python benchmarks/run.py                      # 32 connections, 1,000 keys, 3 rounds of 10 s
    python benchmarks/run.py --connections 128
    python benchmarks/run.py --quick              # a few seconds, to check that it works

Each round serves the bare app, then the metered one, as separate uvicorn processes (uvloop, httptools, one
worker, no access log) pinned to core 0; wrk runs on core 1 with Redis and the Stripe emulator (under
SCHED_FIFO with ``--wrk-priority fifo``, where permitted, so that Redis cannot hold it up). Each server
is warmed up (the metered one fills its key cache) before a measured wrk run. Printed: requests/s, p50 and
p99 per variant and the metered/bare ratios (medians over rounds), Redis commands per request from
``INFO commandstats``, and Redis memory per active (key, period) from ``MEMORY USAGE``. A second part runs
``benchmarks/flusher.py`` (the flusher alone against the emulator) when it is there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import redis

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/run.py` from anywhere: import benchmarks.app

from benchmarks.app import FAMILIES, METER_EVENT_NAME  # noqa: E402
from metered_middleware import BillingTarget, KeyRegistry  # noqa: E402
from metered_middleware._counter import Counter  # noqa: E402
from metered_middleware._layout import Layout  # noqa: E402
from metered_middleware._redis import connect  # noqa: E402
from metered_middleware._redis_server import RedisServer, free_port  # noqa: E402
from metered_middleware._store import CountStore  # noqa: E402

WRK_INSTALL: Final = "apt-get update && apt-get install -y wrk"
PATHS: Final = (*(f"/v1/fonts/{slug}" for slug in FAMILIES), "/v1/fonts")
# wrk: rotate keys and paths per request, report percentiles as one JSON line.
WRK_SCRIPT: Final = """
local keys = {}
for line in io.lines("%(keyfile)s") do keys[#keys + 1] = line end
local paths = {%(paths)s}
local i = 0
request = function()
  i = i + 1
  local key = keys[(i %% #keys) + 1]
  return wrk.format("GET", paths[(i %% #paths) + 1], {["Authorization"] = "Bearer " .. key})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "MMJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"p50_us\\":%%d,\\"p99_us\\":%%d,\\"non2xx\\":%%d,"
    .. "\\"socket_errors\\":%%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(slots=True)
class Load:
    """One measured load run."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int

    @property
    def rps(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(slots=True)
class Sample:
    """One variant in one round: the load and what Redis saw meanwhile."""

    variant: str
    round: int
    load: Load
    commands: dict[str, int] = field(default_factory=dict)
    # The server's CPU time (user + system) over the measured run: per request, and as a share of the wall
    # time. Less sensitive than requests/s to what else the machine runs: noise moves it far less.
    cpu_seconds: float = 0.0
    # Keys the metered app's resolver looked up in Redis during the run (its own count: Redis's HGETALL
    # count also holds the flusher's claims).
    key_lookups: int = 0
    # The share of the machine's CPU time the hypervisor took during the run (see ``machine_ticks``).
    steal: float = 0.0
    # Redis's own CPU time (user + system, ``INFO cpu``) over the run: it shares the load core with wrk.
    redis_cpu_seconds: float = 0.0

    @property
    def redis_us_per_request(self) -> float:
        """Redis CPU microseconds per request (count scripts, the flusher's claims, everything)."""
        return self.redis_cpu_seconds / self.load.requests * 1e6 if self.load.requests else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        """Server CPU microseconds per request."""
        return self.cpu_seconds / self.load.requests * 1e6 if self.load.requests else 0.0

    @property
    def busy(self) -> float:
        """Server CPU time over wall time during the run (1.0: one core fully used)."""
        return self.cpu_seconds / self.load.seconds if self.load.seconds else 0.0


# -- the environment --------------------------------------------------------------------------------


def add_cache_ttl(parser: argparse.ArgumentParser) -> None:
    """``--cache-ttl``: the metered app's ``METERED_CACHE_TTL`` (``MM_BENCH_CACHE_TTL``), in both scripts."""
    parser.add_argument(
        "--cache-ttl",
        type=float,
        default=60.0,
        help="METERED_CACHE_TTL of the metered app (60 s): an expired entry costs a lookup, or a "
        "change-count check, which a run shorter than the TTL never sees; set it lower to include them",
    )


def pin(cpus: str) -> list[str]:
    """A ``taskset`` prefix when pinning is possible on this machine."""
    if shutil.which("taskset") is None or not cpus:
        return []
    if not {int(c) for c in cpus.split(",")} <= set(range(os.cpu_count() or 1)):
        return []
    return ["taskset", "-c", cpus]


def other_cpus(app_cpus: str) -> str:
    """The cores left for wrk, Redis and the emulator (all of them when the machine has one)."""
    count = os.cpu_count() or 1
    taken = {int(c) for c in app_cpus.split(",") if c}
    rest = [str(c) for c in range(count) if c not in taken]
    return ",".join(rest) if rest else ""


def keep_off(app_cpus: str) -> str:
    """Pin this process (so wrk, Redis and the emulator it starts) to the cores the servers leave; those."""
    load_cpus = other_cpus(app_cpus)
    if load_cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {int(c) for c in load_cpus.split(",")})
    return load_cpus


def rotation_script(workdir: Path, keys: Sequence[str]) -> Path:
    """Write the keys and the wrk script that rotates them and the paths per request; the script's path."""
    keyfile = workdir / "keys.txt"
    keyfile.write_text("\n".join(keys) + "\n")
    script = workdir / "rotate.lua"
    paths = ", ".join(f'"{p}"' for p in PATHS)
    script.write_text(WRK_SCRIPT % {"keyfile": keyfile, "paths": paths})
    return script


def stop(proc: subprocess.Popen[bytes]) -> int:
    """Stop a process group started with ``start_new_session`` (SIGTERM, then SIGKILL); its exit status
    if it had exited by itself, else 0."""
    if proc.poll() is not None:
        return proc.returncode
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return 0


@contextlib.contextmanager
def server(
    factory: str, port: int, env: dict[str, str], *, workers: int, cpus: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A uvicorn process serving ``benchmarks.app:<factory>`` (or ``module:factory``), stopped on exit."""
    command = [
        *pin(cpus),
        sys.executable,
        "-m",
        "uvicorn",
        (factory if ":" in factory else f"benchmarks.app:{factory}"),
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{factory} exited with {proc.returncode} before serving")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{factory} did not answer within 30 s")
            time.sleep(0.05)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def flusher_worker(env: dict[str, str], *, cpus: str) -> Iterator[subprocess.Popen[bytes] | None]:
    """``metered-middleware flush`` as its own process (the deployment for busy apps), or nothing."""
    if env.get("MM_BENCH_FLUSHER") != "worker":
        yield None
        return
    worker_env = {
        **os.environ,
        "STRIPE_API_KEY": "sk_test_benchmark",
        "METERED_REDIS_URL": env["MM_BENCH_REDIS_URL"],
        "METERED_STRIPE_API_BASE": env["MM_BENCH_STRIPE_URL"],
        "METERED_SINK": env["MM_BENCH_SINK"],
        "METERED_HTTP_CLIENT": env["MM_BENCH_HTTP_CLIENT"],
        "METERED_METER_EVENT_NAME": METER_EVENT_NAME,
        "METERED_RATE_LIMIT": env["MM_BENCH_STRIPE_RATE"],
        "METERED_FLUSH_INTERVAL": env["MM_BENCH_FLUSH_INTERVAL"],
        "METERED_SHUTDOWN_GRACE": "2",
    }
    command = [*pin(cpus), sys.executable, "-m", "metered_middleware.cli", "flush"]
    proc = subprocess.Popen(command, cwd=ROOT, env=worker_env, start_new_session=True)
    try:
        # Serve once the worker holds every shard's lease: its first pass (claims run an HGETALL, which would
        # read as key lookups) is then over or under way before the measured run, as in a long-running app.
        layout = Layout()
        client = redis.Redis.from_url(env["MM_BENCH_REDIS_URL"])
        deadline = time.monotonic() + 30
        while client.exists(*(layout.lease(s) for s in range(layout.shards))) < layout.shards:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the flusher worker did not take its leases within 30 s")
            time.sleep(0.05)
        client.close()
        time.sleep(0.5)
        yield proc
    finally:
        if stop(proc):
            raise RuntimeError(f"the flusher worker exited with {proc.returncode}")


# -- load generators --------------------------------------------------------------------------------


def realtime_prefix() -> list[str]:
    """``chrt -f 10`` when this machine lets us run wrk under SCHED_FIFO, else nothing.

    wrk shares the load core with Redis and the metered stack's flusher. A count write of a few hundred
    lines keeps Redis busy for milliseconds, and a wrk that waits behind it sends nothing meanwhile: with
    32 connections the metered server then sat 2-3% idle (session 8). Under SCHED_FIFO wrk runs as soon
    as a response arrives (it uses under half the core). That also changes how requests bunch up in the
    servers, and at 128 connections it moved the throughput ratio by 7 points, so it is an option, not
    the default: compare runs made the same way.
    """
    if shutil.which("chrt") is None:
        return []
    probe = subprocess.run(["chrt", "-f", "10", "true"], capture_output=True, check=False)
    return ["chrt", "-f", "10"] if probe.returncode == 0 else []


def run_wrk(
    url: str, script: Path, *, connections: int, seconds: float, cpus: str, priority: Sequence[str] = ()
) -> Load:
    """One wrk run (one thread) against ``url``; percentiles come from the script's ``done`` hook."""
    command = [
        *pin(cpus),
        *priority,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("MMJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{out}")
    data = json.loads(line[7:])
    return Load(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non2xx=data["non2xx"],
        socket_errors=data["socket_errors"],
    )


async def _httpx_load(url: str, keys: Sequence[str], connections: int, seconds: float) -> Load:
    latencies: list[float] = []
    non2xx = errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=5) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(offset: int) -> None:
            nonlocal non2xx, errors
            i = offset
            while time.perf_counter() < deadline:
                i += connections
                began = time.perf_counter()
                try:
                    response = await client.get(
                        PATHS[i % len(PATHS)], headers={"Authorization": f"Bearer {keys[i % len(keys)]}"}
                    )
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - began)
                non2xx += not 200 <= response.status_code < 400

        await asyncio.gather(*(worker(n) for n in range(connections)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies) or [0.0]
    return Load(
        requests=len(latencies),
        seconds=elapsed,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        non2xx=non2xx,
        socket_errors=errors,
    )


def prime(url: str, keys: Sequence[str], *, connections: int = 32) -> None:
    """Every key once, so that the measured run starts with every key cached, whatever the warm-up reached
    (a slow machine's short warm-up once left a key for the measured run to look up)."""

    async def go() -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        gate = asyncio.Semaphore(connections)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

            async def one(key: str) -> None:
                async with gate:
                    response = await client.get(PATHS[0], headers={"Authorization": f"Bearer {key}"})
                if response.status_code != 200:
                    raise RuntimeError(f"a benchmark key was refused: {response.status_code} {response.text}")

            await asyncio.gather(*(one(key) for key in keys))

    asyncio.run(go())


def run_httpx(url: str, keys: Sequence[str], *, connections: int, seconds: float) -> Load:
    """The fallback load generator (no wrk): far slower than the server, so only a smoke test."""
    return asyncio.run(_httpx_load(url, keys, connections, seconds))


# -- fixtures: customers, a meter and keys -----------------------------------------------------------


def make_targets(stripe_client: Any, count: int) -> list[BillingTarget]:
    """A meter and ``count`` customers in the emulator, one billing target each, in a 30-day period."""
    stripe_client.v1.billing.meters.create(
        {
            "display_name": "Font API requests",
            "event_name": METER_EVENT_NAME,
            "default_aggregation": {"formula": "sum"},
        }
    )
    now = int(time.time())
    start, end = now - 86_400, now + 29 * 86_400
    targets = []
    for n in range(count):
        customer = stripe_client.v1.customers.create({"email": f"bench{n}@example.com"})
        targets.append(
            BillingTarget(
                customer=customer.id,
                meter_event_name=METER_EVENT_NAME,
                status="active",
                period_start=start,
                period_end=end,
                plan="bench",
            )
        )
    return targets


async def issue_keys(redis_url: str, targets: Sequence[BillingTarget]) -> list[str]:
    """One API key per target in the Redis key registry."""
    client = connect(redis_url)
    try:
        registry = KeyRegistry(client)
        return [(await registry.create(target)).key for target in targets]
    finally:
        await client.aclose()


# -- Redis figures ----------------------------------------------------------------------------------


def command_counts(client: redis.Redis) -> dict[str, int]:
    """Calls per command so far (commands scripts run are counted too, under their own names)."""
    stats = client.info("commandstats")
    counts: dict[str, int] = {}
    for name, value in stats.items():
        if isinstance(value, dict):
            counts[name.removeprefix("cmdstat_")] = int(value["calls"])
    return counts


def redis_cpu(client: redis.Redis) -> float:
    """Redis's CPU seconds so far (user + system), from ``INFO cpu``."""
    stats = client.info("cpu")
    return float(stats["used_cpu_user"]) + float(stats["used_cpu_sys"])


def key_lookups(url: str) -> int:
    """Keys the metered app's resolver has looked up in Redis so far (``/health/lookups``)."""
    return int(httpx.get(f"{url}/health/lookups", timeout=10).json()["lookups"])


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per-command calls between two snapshots (the INFO call itself excluded)."""
    out = {name: calls - before.get(name, 0) for name, calls in after.items()}
    out["info"] = max(0, out.get("info", 0) - 1)
    return {name: calls for name, calls in out.items() if calls > 0}


async def memory_per_target(redis_url: str, targets: Sequence[BillingTarget]) -> dict[str, float]:
    """Bytes per active (key, period) of the counting state, written the way the middleware writes it.

    One coalesced flush of every target, nothing claimed yet (the worst moment: every target pending), in
    a namespace of its own; ``MEMORY USAGE ... SAMPLES 0`` of each hash, divided by the number of targets.
    """
    client = connect(redis_url)
    layout = Layout("mmmem", 4)
    try:
        counter = Counter(CountStore(client, layout), layout, window=0)
        for target in targets:
            counter.add(target, 1)
        await counter.flush()
        sizes: dict[str, int] = {}
        async for raw in client.scan_iter(match="mmmem:*", count=1000):
            name = raw.decode()
            kind = name.rsplit("}:", 1)[-1].split(":", 1)[0]
            sizes[kind] = sizes.get(kind, 0) + int(await client.memory_usage(name, samples=0) or 0)
        await client.delete(*[k async for k in client.scan_iter(match="mmmem:*", count=1000)])
        await counter.aclose()
    finally:
        await client.aclose()
    n = len(targets)
    per = {kind: size / n for kind, size in sorted(sizes.items())}
    per["counting (pending + usage)"] = per.get("pending", 0.0) + per.get("usage", 0.0)
    per["all counting state"] = sum(size for size in sizes.values()) / n
    return per


# -- the run ----------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, 0 for nothing."""
    return statistics.median(values) if values else 0.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--keys", type=int, default=1000, help="API keys, rotated per request (1000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each run (2)")
    parser.add_argument("--rounds", type=int, default=3, help="bare/metered pairs, at least 3 (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server (default 1)")
    parser.add_argument("--app-cpus", default="0", help="cores for the servers (taskset -c, default 0)")
    parser.add_argument(
        "--flusher",
        choices=("worker", "in-app", "none"),
        default="worker",
        help="where the metered stack's flusher runs: its own `metered-middleware flush` process on the "
        "load core (worker, the default), in the app's lifespan on the app's core (in-app), or not at all",
    )
    parser.add_argument("--sink", default="meter_events", help="the flusher's sink (meter_events)")
    parser.add_argument("--stripe-rate", default="auto", help="the flusher's Stripe rate limit (auto)")
    parser.add_argument(
        "--http-client",
        choices=("auto", "httpx", "aiohttp"),
        default="auto",
        help="the flusher's transport to Stripe, METERED_HTTP_CLIENT (auto: the default, aiohttp on asyncio)",
    )
    parser.add_argument("--flush-interval", type=float, default=5.0, help="the flusher's interval (5 s)")
    parser.add_argument(
        "--wrk-priority",
        choices=("fifo", "normal"),
        default="normal",
        help="wrk at normal priority (the default), or under SCHED_FIFO where permitted (fifo), so that "
        "Redis and the flusher on the load core cannot hold it up",
    )
    parser.add_argument(
        "--window", type=float, default=0.05, help="METERED_COALESCE_WINDOW of the metered app (0.05 s)"
    )
    add_cache_ttl(parser)
    parser.add_argument("--no-flusher-part", action="store_true", help="skip the flusher-alone part")
    parser.add_argument(
        "--flusher-targets",
        default="10000,100000",
        help="pending targets for the flusher-alone part, comma-separated (10000,100000)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="record both servers with py-spy during round 1 (collapsed stacks: FILE, bare: FILE.bare)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="wrk when installed (auto), or the built-in httpx generator (only with --quick)",
    )
    parser.add_argument(
        "--max-steal",
        type=float,
        default=0.02,
        help="measure a round again when the hypervisor stole more than this share during it (0.02)",
    )
    parser.add_argument(
        "--steal-retries", type=int, default=2, help="at most this many more tries per round (default 2)"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also serve, each round, the app behind a middleware that only reads the key header (the "
        "floor the issue names), and print floor/bare and metered/floor",
    )
    parser.add_argument("--json", type=Path, help="also write every sample and the summary here")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: 2 keys, 1 s, 1 round")
    args = parser.parse_args(argv)
    if args.steal_retries < 0:
        parser.error("--steal-retries must be 0 or more")
    if not 0 <= args.max_steal <= 1:
        parser.error("--max-steal is a share of CPU time, from 0 to 1")
    if args.quick:
        args.keys, args.duration, args.warmup, args.rounds = min(args.keys, 20), 1.0, 0.5, 1
        args.connections = min(args.connections, 8)
        args.no_flusher_part = True
    elif args.rounds < 3:
        parser.error("--rounds must be at least 3 (medians of fewer are not worth printing)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the tables; returns the exit status."""
    args = parse_args(argv)
    have_wrk = shutil.which("wrk") is not None and args.load_generator != "httpx"
    if not have_wrk:
        if args.load_generator != "httpx":
            print(f"wrk is not installed; install it with: {WRK_INSTALL}", file=sys.stderr)
        if not args.quick:
            if args.load_generator == "httpx":
                print(
                    "the httpx generator is only for --quick: it is slower than the server", file=sys.stderr
                )
            return 2
        print("--quick: using the built-in httpx load generator (figures are not comparable)")
    app_cpus = args.app_cpus
    load_cpus = keep_off(app_cpus)
    priority = realtime_prefix() if args.wrk_priority == "fifo" and have_wrk else []
    args.wrk_priority_used = "fifo" if priority else "normal"
    if args.wrk_priority == "fifo" and have_wrk and not priority:
        print("wrk runs at normal priority: `chrt -f` is not permitted here (needs CAP_SYS_NICE)")

    from metered_middleware.testing.emulator import StripeEmulator

    redis_server = RedisServer().start()
    emulator = StripeEmulator(rate_limit=None).start()
    workdir = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    try:
        print(f"setting up {args.keys} customers and keys ...", flush=True)
        targets = make_targets(emulator.client(), args.keys)
        keys = asyncio.run(issue_keys(redis_server.url, targets))
        script = rotation_script(workdir, keys)
        env = {
            "MM_BENCH_REDIS_URL": redis_server.url,
            "MM_BENCH_STRIPE_URL": emulator.url,
            "MM_BENCH_SINK": args.sink,
            "MM_BENCH_HTTP_CLIENT": args.http_client,
            "MM_BENCH_STRIPE_RATE": args.stripe_rate,
            "MM_BENCH_FLUSH_INTERVAL": str(args.flush_interval),
            "MM_BENCH_IN_APP_FLUSHER": "1" if args.flusher == "in-app" else "0",
            "MM_BENCH_FLUSHER": args.flusher,
            "MM_BENCH_COALESCE_WINDOW": str(args.window),
            "MM_BENCH_CACHE_TTL": str(args.cache_ttl),
        }
        stats = redis.Redis.from_url(redis_server.url)

        def drive(url: str, seconds: float) -> Load:
            if have_wrk:
                return run_wrk(
                    url,
                    script,
                    connections=args.connections,
                    seconds=seconds,
                    cpus=load_cpus,
                    priority=priority,
                )
            return run_httpx(url, keys, connections=args.connections, seconds=seconds)

        def measure(n: int, variant: str) -> Sample:
            port = free_port()
            factory = f"create_{variant}"
            worker_env = env if variant == "metered" else {**env, "MM_BENCH_FLUSHER": "none"}
            with (
                flusher_worker(worker_env, cpus=load_cpus) as worker,
                server(factory, port, env, workers=args.workers, cpus=app_cpus) as proc,
            ):
                url = f"http://127.0.0.1:{port}"
                prime(url, keys)  # both variants, so both are warmed alike
                drive(url, args.warmup)
                spy = None
                if args.profile and n == 1:
                    out = args.profile if variant == "metered" else args.profile.with_suffix(".bare")
                    spy = start_profile(proc.pid, out, args.duration)
                lookups_before = key_lookups(url) if variant == "metered" else 0
                before = command_counts(stats)
                redis_before = redis_cpu(stats)
                cpu_before = process_cpu(proc.pid)
                worker_before = process_cpu(worker.pid) if worker is not None else 0.0
                ticks_before = machine_ticks()
                load = drive(url, args.duration)
                steal = steal_share(ticks_before, machine_ticks())
                cpu = process_cpu(proc.pid) - cpu_before
                worker_cpu = process_cpu(worker.pid) - worker_before if worker is not None else 0.0
                redis_seconds = redis_cpu(stats) - redis_before
                commands = delta(before, command_counts(stats))
                lookups = key_lookups(url) - lookups_before if variant == "metered" else 0
                if spy is not None:
                    spy.wait()
            sample = Sample(variant, n, load, commands, cpu, lookups, steal, redis_seconds)
            print(
                f"round {n} {variant:7} {load.rps:9.0f} req/s  p50 {load.p50_ms:6.2f} ms  "
                f"p99 {load.p99_ms:6.2f} ms  CPU {sample.cpu_us_per_request:5.1f} us/req "
                f"busy {sample.busy:4.0%}  "
                f"non-2xx {load.non2xx}  socket errors {load.socket_errors}  steal {steal:5.1%}  "
                f"Redis {sample.redis_us_per_request:4.1f} us/req"
                + (f"  flusher worker busy {worker_cpu / load.seconds:4.0%}" if worker_cpu else ""),
                flush=True,
            )
            return sample

        # With --floor, each round also serves the app behind a middleware that only reads the key header
        # (benchmarks.app.HeaderOnly): how much of metered/bare on this machine, today, is any middleware's.
        variants = ("bare", "floor", "metered") if args.floor else ("bare", "metered")
        samples: list[Sample] = []
        measured: list[Sample] = []  # every try, kept or not: a failed response in any fails the run
        for n in range(1, args.rounds + 1):
            tries: list[list[Sample]] = []
            while True:
                tries.append([measure(n, variant) for variant in variants])
                worst = max(s.steal for s in tries[-1])
                if worst <= args.max_steal or len(tries) > args.steal_retries:
                    break
                print(
                    f"round {n}: {worst:.1%} stolen by the hypervisor, measuring the round again", flush=True
                )
            kept = least_stolen(tries)
            if len(tries) > 1:
                print(f"round {n}: keeping try {kept + 1} of {len(tries)}", flush=True)
            samples += tries[kept]
            measured += [sample for pair in tries for sample in pair]
        memory = asyncio.run(memory_per_target(redis_server.url, targets))
        stats.close()
        summary = summarize(samples, memory, args)
        print_summary(summary)
        if args.json:
            args.json.write_text(
                json.dumps({"summary": summary, "samples": [_sample_dict(s) for s in samples]}, indent=2)
            )
        status = 0 if all(s.load.non2xx == 0 for s in measured) else 1
        if status:
            print("some responses were not 2xx: the figures do not measure what they claim", file=sys.stderr)
        if not args.no_flusher_part:
            targets_list = [int(t) for t in args.flusher_targets.split(",") if t.strip()]
            status = max(status, flusher_part(targets_list))
        return status
    finally:
        emulator.stop()
        redis_server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _sample_dict(sample: Sample) -> dict[str, Any]:
    load = sample.load
    return {
        "variant": sample.variant,
        "round": sample.round,
        "rps": load.rps,
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "requests": load.requests,
        "non2xx": load.non2xx,
        "socket_errors": load.socket_errors,
        "commands": sample.commands,
        "key_lookups": sample.key_lookups,
        "cpu_us_per_request": sample.cpu_us_per_request,
        "busy": sample.busy,
        "steal": sample.steal,
        "redis_us_per_request": sample.redis_us_per_request,
    }


def summarize(
    samples: Sequence[Sample], memory: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    """Medians per variant, metered/bare ratios, Redis work per request and memory per key and period."""
    out: dict[str, Any] = {
        "connections": args.connections,
        "keys": args.keys,
        "duration": args.duration,
        "rounds": args.rounds,
        "workers": args.workers,
        "flusher": args.flusher,
        "window": args.window,
        "wrk_priority": getattr(args, "wrk_priority_used", "normal"),
    }
    for variant in ("bare", "floor", "metered"):
        mine = [s.load for s in samples if s.variant == variant]
        if not mine:
            continue
        out[variant] = {
            "rps": median([x.rps for x in mine]),
            "p50_ms": median([x.p50_ms for x in mine]),
            "p99_ms": median([x.p99_ms for x in mine]),
            "cpu_us_per_request": median([s.cpu_us_per_request for s in samples if s.variant == variant]),
            "busy": median([s.busy for s in samples if s.variant == variant]),
            "redis_us_per_request": median([s.redis_us_per_request for s in samples if s.variant == variant]),
        }
    bare, metered = out["bare"], out["metered"]
    out["ratio"] = {
        key: metered[key] / bare[key] if bare[key] else 0.0 for key in ("rps", "p50_ms", "p99_ms")
    }
    # Each round's metered/bare, which the machine's drift between rounds moves less than the medians.
    by_round: dict[int, dict[str, Load]] = {}
    for s in samples:
        by_round.setdefault(s.round, {})[s.variant] = s.load
    pairs = [r for r in by_round.values() if "metered" in r and r.get("bare") and r["bare"].rps]
    out["paired_rps_ratio"] = median([r["metered"].rps / r["bare"].rps for r in pairs])
    if "floor" in out:
        floor = out["floor"]
        out["floor_ratio"] = {
            key: floor[key] / bare[key] if bare[key] else 0.0 for key in ("rps", "p50_ms", "p99_ms")
        }
        out["paired_floor_ratio"] = median([r["floor"].rps / r["bare"].rps for r in pairs if "floor" in r])
        out["paired_metered_over_floor"] = median(
            [r["metered"].rps / r["floor"].rps for r in pairs if "floor" in r and r["floor"].rps]
        )
    metered_samples = [s for s in samples if s.variant == "metered"]
    requests = sum(s.load.requests for s in metered_samples) or 1
    totals: dict[str, int] = {}
    for s in metered_samples:
        for name, calls in s.commands.items():
            totals[name] = totals.get(name, 0) + calls
    out["redis_per_request"] = {
        "commands": sum(totals.values()) / requests,
        # A script call carries a whole shard's window of counts; the pipeline sends the shards together.
        "count_scripts": (totals.get("evalsha", 0) + totals.get("eval", 0)) / requests,
        "key_lookups": sum(s.key_lookups for s in metered_samples) / requests,
        "by_command": {name: calls / requests for name, calls in sorted(totals.items())},
    }
    out["memory_bytes_per_key_period"] = memory
    steals = [s.steal for s in samples]
    out["steal"] = {
        "median": median(steals),
        "max": max(steals, default=0.0),
        "limit": args.max_steal,
        "rounds_over": len({s.round for s in samples if s.steal > args.max_steal}),
    }
    return out


def print_summary(summary: dict[str, Any]) -> None:
    """The results table, in the README's shape."""
    bare, metered, ratio = summary["bare"], summary["metered"], summary["ratio"]
    print()
    print(
        f"{summary['connections']} connections, {summary['keys']} keys, {summary['rounds']} rounds of "
        f"{summary['duration']:g} s, {summary['workers']} worker(s), flusher {summary['flusher']}, "
        f"window {summary['window']:g} s, wrk priority {summary['wrk_priority']}; medians"
    )
    print("| | requests/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    print(f"| bare | {bare['rps']:.0f} | {bare['p50_ms']:.2f} | {bare['p99_ms']:.2f} |")
    print(f"| metered | {metered['rps']:.0f} | {metered['p50_ms']:.2f} | {metered['p99_ms']:.2f} |")
    print(f"| metered / bare | {ratio['rps']:.3f} | {ratio['p50_ms']:.2f} | {ratio['p99_ms']:.2f} |")
    if "floor" in summary:
        floor, floor_ratio = summary["floor"], summary["floor_ratio"]
        print(
            f"| floor (key header read only) | {floor['rps']:.0f} | {floor['p50_ms']:.2f} | "
            f"{floor['p99_ms']:.2f} |"
        )
        print(
            f"| floor / bare | {floor_ratio['rps']:.3f} | {floor_ratio['p50_ms']:.2f} | "
            f"{floor_ratio['p99_ms']:.2f} |"
        )
    print(f"median of the rounds' own metered/bare throughput ratios: {summary['paired_rps_ratio']:.3f}")
    if "floor" in summary:
        print(
            f"median of the rounds' own floor/bare ratios: {summary['paired_floor_ratio']:.3f}; "
            f"metered/floor: {summary['paired_metered_over_floor']:.3f}; server CPU per request, floor "
            f"{summary['floor']['cpu_us_per_request']:.1f} us"
        )
    print(
        f"server CPU per request: bare {bare['cpu_us_per_request']:.1f} us (busy {bare['busy']:.0%}), "
        f"metered {metered['cpu_us_per_request']:.1f} us (busy {metered['busy']:.0%}): metering costs "
        f"{metered['cpu_us_per_request'] - bare['cpu_us_per_request']:.1f} us a request"
    )
    steal = summary["steal"]
    print(
        f"hypervisor steal during the kept runs: median {steal['median']:.1%}, max {steal['max']:.1%}; "
        f"{steal['rounds_over']} of {summary['rounds']} round(s) over {steal['limit']:.1%} after their "
        "retries" + (" (they measured the neighbours as much as the app)" if steal["rounds_over"] else "")
    )
    per = summary["redis_per_request"]
    print()
    print(
        f"Redis per metered request: {per['commands']:.4f} commands (script internals included), "
        f"{per['count_scripts']:.5f} count scripts, {per['key_lookups']:.5f} key lookups, "
        f"{metered['redis_us_per_request']:.1f} us of Redis CPU on the load core "
        f"(bare: {bare['redis_us_per_request']:.1f})"
    )
    print("  " + ", ".join(f"{name} {value:.5f}" for name, value in per["by_command"].items()))
    memory = summary["memory_bytes_per_key_period"]
    print("Redis bytes per active (key, period): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))


def flusher_part(target_counts: Sequence[int]) -> int:
    """The flusher alone, by its owner's script (its own Redis and emulator, limits off); exit status."""
    script = ROOT / "benchmarks" / "flusher.py"
    if not script.exists():
        print("\nflusher part skipped: benchmarks/flusher.py is not there")
        return 0
    # The load part pinned this process (and so its children) to the load cores: give the flusher and its
    # emulator process the whole machine again, as when the script is run by hand.
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    status = 0
    for count in target_counts:
        print(
            f"\nflusher alone, {count} pending targets (benchmarks/flusher.py --targets {count}):", flush=True
        )
        command = [sys.executable, str(script), "--targets", str(count)]
        status = max(status, subprocess.run(command, cwd=ROOT, check=False).returncode)
    return status


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(stolen, all) CPU clock ticks of the machine so far, from /proc/stat ((0, 0) where there is none).

    Steal is time the hypervisor ran something else on our virtual CPUs. On a shared cloud machine it
    comes in bursts, and a run it lands in is slower (and has tails of hundreds of ms) for reasons that
    are not the app's: each run prints its share, so such rounds can be told from the others.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0, 0
    # user nice system idle iowait irq softirq steal (guest time is already counted in user)
    values = [int(v) for v in fields]
    return (values[7] if len(values) == 8 else 0), sum(values)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The stolen share of the machine's CPU time between two ``machine_ticks`` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def least_stolen(tries: Sequence[Sequence[Sample]]) -> int:
    """Of a round's tries (a bare and a metered sample each, and a floor one with --floor), the index of the
    one whose worst run lost least to steal (the first of equals). A try is kept whole, so the round's own
    ratios still compare neighbouring runs."""
    return min(range(len(tries)), key=lambda n: max(s.steal for s in tries[n]))


def start_profile(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy on the server for one measured run (collapsed stacks), if py-spy is installed."""
    if shutil.which("py-spy") is None:
        print("--profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return None
    command = ["py-spy", "record", "-p", str(pid), "-d", str(max(1, round(seconds) - 1)), "-r", "250"]
    return subprocess.Popen([*command, "-f", "raw", "--nonblocking", "-o", str(out)])


if __name__ == "__main__":
    sys.exit(main())
