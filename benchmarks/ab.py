"""Two app variants served at the same time on one core, each under its own wrk: their cost per request.

    python benchmarks/ab.py create_bare create_metered            # 5 rounds of 5 s, 32 connections each
    python benchmarks/ab.py create_bare mymodule:factory --rounds 8
    python benchmarks/ab.py create_metered create_metered --b-path ../old/src   # two versions of the package

``run.py`` alternates bare and metered, so anything else the machine does between two runs (another
tenant on the host, a noisy neighbour core) lands on one variant and not the other: on a shared machine
the same app measured 88 to 126 us a request from one run to the next. Here both servers share the app
core at once, each driven by its own wrk on the load core, so that noise lands on both alike. The figure
that matters is the **cost ratio**, A's server CPU per request over B's, which moved by about 0.01
between rounds where run.py's ratio moved by 0.1. It is an instrument for comparing variants (uvicorn
factories, ``module:function`` or a name in ``benchmarks.app``), not the issue's benchmark: no flusher runs
and the two servers interleave on one core, so absolute requests/s are not comparable with run.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402
from metered_middleware._redis_server import RedisServer, free_port  # noqa: E402


def start_wrk(url: str, script: Path, *, connections: int, seconds: int, cpus: str) -> subprocess.Popen[str]:
    """One wrk (one thread) against ``url``, running in the background."""
    command = [*run.pin(cpus), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    return subprocess.Popen([*command, "-s", str(script), url], stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The summary line the rotation script prints at the end of a wrk run."""
    out = proc.communicate()[0]
    line = next((x for x in out.splitlines() if x.startswith("MMJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{out}")
    data: dict[str, Any] = json.loads(line[7:])
    return data


def key_lookups(url: str) -> int | None:
    """Keys a metered server (``benchmarks.app.create_metered``) has looked up in Redis so far; None for a
    server without the metered app's ``/health/lookups``."""
    try:
        response = httpx.get(f"{url}/health/lookups", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return int(response.json()["lookups"])


def with_path(env: dict[str, str], path: str) -> dict[str, str]:
    """``env`` with ``path`` first on PYTHONPATH (ahead of the installed package), or as it is."""
    if not path:
        return env
    rest = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(path).resolve()), rest) if p)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print each round and the medians; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", help="the reference factory (e.g. create_bare)")
    parser.add_argument("b", help="the factory compared with it (e.g. create_metered)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="measured runs per round on the same two servers, each printed (1): more shows how a "
        "server's cost moves as it keeps running",
    )
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each run (2; 0: none)")
    parser.add_argument("--connections", type=int, default=32, help="connections per wrk (default 32)")
    parser.add_argument("--keys", type=int, default=1000, help="API keys, rotated per request (1000)")
    parser.add_argument("--window", type=float, default=0.05, help="METERED_COALESCE_WINDOW (0.05 s)")
    run.add_cache_ttl(parser)
    parser.add_argument("--app-cpus", default="0", help="the core both servers share (default 0)")
    for side in ("a", "b"):
        parser.add_argument(
            f"--{side}-path",
            default="",
            help=f"put this first on {side}'s PYTHONPATH: another checkout's src (with its extension built) "
            "serves that version of the package, to compare two versions side by side",
        )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print(f"wrk is not installed; install it with: {run.WRK_INSTALL}", file=sys.stderr)
        return 2
    load_cpus = run.keep_off(args.app_cpus)

    from metered_middleware.testing.emulator import StripeEmulator

    redis_server = RedisServer().start()
    emulator = StripeEmulator(rate_limit=None).start()
    workdir = Path(tempfile.mkdtemp(prefix="mm-ab-"))
    try:
        targets = run.make_targets(emulator.client(), args.keys)
        keys = asyncio.run(run.issue_keys(redis_server.url, targets))
        script = run.rotation_script(workdir, keys)
        env = {
            "MM_BENCH_REDIS_URL": redis_server.url,
            "MM_BENCH_STRIPE_URL": emulator.url,
            "MM_BENCH_IN_APP_FLUSHER": "0",
            "MM_BENCH_COALESCE_WINDOW": str(args.window),
            "MM_BENCH_CACHE_TTL": str(args.cache_ttl),
        }
        cost_ratios: list[float] = []
        cpu: dict[str, list[float]] = {"a": [], "b": []}
        missed = 0  # keys a metered server looked up during the measured runs: its cache was not warm
        status = 0
        for n in range(1, args.rounds + 1):
            with contextlib.ExitStack() as stack:
                port_a, port_b = free_port(), free_port()
                env_a, env_b = (with_path(env, args.a_path), with_path(env, args.b_path))
                a = stack.enter_context(run.server(args.a, port_a, env_a, workers=1, cpus=args.app_cpus))
                b = stack.enter_context(run.server(args.b, port_b, env_b, workers=1, cpus=args.app_cpus))
                urls = (f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}")

                def both(seconds: int, urls: tuple[str, str] = urls) -> list[dict[str, Any]]:
                    procs = [
                        start_wrk(u, script, connections=args.connections, seconds=seconds, cpus=load_cpus)
                        for u in urls
                    ]
                    return [result(p) for p in procs]

                if args.warmup > 0:
                    both(args.warmup)
                for k in range(1, args.runs + 1):
                    label = f"round {n}" if args.runs == 1 else f"round {n} run {k}"
                    looked_up = [key_lookups(u) for u in urls]
                    before = run.process_cpu(a.pid), run.process_cpu(b.pid)
                    ticks = run.machine_ticks()
                    load_a, load_b = both(args.duration)
                    used = run.process_cpu(a.pid) - before[0], run.process_cpu(b.pid) - before[1]
                    steal = run.steal_share(ticks, run.machine_ticks())
                    after = [key_lookups(u) for u in urls]
                    lookups = [
                        None if start is None or end is None else end - start
                        for start, end in zip(looked_up, after, strict=True)
                    ]
                    missed += sum(n or 0 for n in lookups)
                    us_a = used[0] / max(1, load_a["requests"]) * 1e6
                    us_b = used[1] / max(1, load_b["requests"]) * 1e6
                    cpu["a"].append(us_a)
                    cpu["b"].append(us_b)
                    cost_ratios.append(us_a / us_b if us_b else 0.0)
                    bad = sum(load["non2xx"] + load["socket_errors"] for load in (load_a, load_b))
                    status = status or int(bad > 0)
                    print(
                        f"{label}: a {load_a['requests']} requests {us_a:6.1f} us/req p99 "
                        f"{load_a['p99_us'] / 1000:.2f} ms | b {load_b['requests']} requests "
                        f"{us_b:6.1f} us/req p99 {load_b['p99_us'] / 1000:.2f} ms | cost ratio a/b "
                        f"{cost_ratios[-1]:.3f} | steal {steal:.1%} | key lookups a/b "
                        + "/".join("-" if n is None else str(n) for n in lookups)
                        + (f"  ({bad} non-2xx or socket errors)" if bad else ""),
                        flush=True,
                    )
        print(
            f"\n{len(cost_ratios)} runs: server CPU per request a {statistics.median(cpu['a']):.1f} us, "
            f"b {statistics.median(cpu['b']):.1f} us; cost ratio a/b, median "
            f"{statistics.median(cost_ratios):.3f} (range {min(cost_ratios):.3f}-{max(cost_ratios):.3f})"
        )
        if missed:
            # The servers start cold each round: a warm-up shorter than one pass over the keys leaves some
            # uncached, and a miss (a Redis lookup on the general path) costs many cached requests.
            print(
                f"the metered server(s) looked up {missed} keys in Redis during the measured runs, so the "
                "figures include those lookups: entries that expired (--cache-ttl) or a cache not yet warm "
                f"(a --warmup long enough for {args.keys} requests a server measures cached requests)"
            )
        if status:
            print("some responses were not 2xx: the figures do not measure what they claim", file=sys.stderr)
        return status
    finally:
        emulator.stop()
        redis_server.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
