"""The benchmark script keeps working: a tiny run each way (it asserts no timing, only that it measures)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str, *args: str) -> str:
    """Run ``benchmarks/<name>`` with ``args``; it must succeed. Its standard output."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _quick(tmp_path: Path, *extra: str) -> dict[str, object]:
    out = tmp_path / "result.json"
    stdout = _script("run.py", "--quick", "--json", str(out), *extra)
    assert "| metered / bare |" in stdout
    result: dict[str, object] = json.loads(out.read_text())
    return result


def _check(result: dict[str, object]) -> dict[str, Any]:
    """The checks every quick run must pass; its summary."""
    summary = result["summary"]
    assert isinstance(summary, dict)
    for variant in ("bare", "metered"):
        assert summary[variant]["rps"] > 0
    per = summary["redis_per_request"]
    assert per["key_lookups"] == 0, "warmed-up key cache: no Redis lookups to resolve keys"
    assert summary["memory_bytes_per_key_period"]["usage"] > 0
    steal = summary["steal"]
    assert 0 <= steal["median"] <= steal["max"] <= 1
    assert steal["rounds_over"] == (1 if steal["max"] > steal["limit"] else 0)  # --quick: one round
    samples = result["samples"]
    assert isinstance(samples, list)
    assert all(0 <= sample["steal"] <= 1 for sample in samples)
    # Redis's CPU over each run is a difference of two INFO readings: never negative, and in the summary.
    assert all(sample["redis_us_per_request"] >= 0 for sample in samples)
    assert summary["metered"]["redis_us_per_request"] >= 0
    return summary


@pytest.mark.parametrize("generator", ["auto", "httpx"])
def test_quick_run_measures_both_apps_and_redis(tmp_path: Path, generator: str) -> None:
    """A --quick run serves the bare and the metered app, all 2xx, and reports Redis work and memory."""
    if generator == "auto" and shutil.which("wrk") is None:
        generator = "httpx"  # the script says how to install wrk and falls back; both paths still run
    result = _check(_quick(tmp_path, "--load-generator", generator))
    assert result["wrk_priority"] == "normal"


def test_quick_run_with_the_floor_serves_the_header_only_middleware_too(tmp_path: Path) -> None:
    """--floor serves, each round, the app behind a middleware that only reads the key header, and prints
    the ratios against it."""
    result = _quick(tmp_path, "--load-generator", "httpx", "--floor")
    summary = _check(result)
    samples = result["samples"]
    assert isinstance(samples, list)
    assert [sample["variant"] for sample in samples] == ["bare", "floor", "metered"]
    assert summary["floor"]["rps"] > 0
    assert summary["paired_floor_ratio"] > 0
    assert summary["paired_metered_over_floor"] > 0


@pytest.mark.anyio
async def test_the_floor_middleware_reads_the_bearer_key_and_nothing_more() -> None:
    """The floor does what any key-reading middleware must: it finds the key, and it changes no response."""
    import httpx

    from benchmarks.app import HeaderOnly, create_bare

    seen: list[object] = []
    bare = create_bare()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope.get("state", {}).get("api_key_length"))
        await bare(scope, receive, send)

    transport = httpx.ASGITransport(app=HeaderOnly(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        keyed = await http.get("/v1/fonts", headers={"Authorization": "Bearer mm_abc123"})
        unkeyed = await http.get("/v1/fonts")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare), base_url="http://t") as http:
        plain = await http.get("/v1/fonts")
    assert seen == [len("mm_abc123"), None]
    assert keyed.content == unkeyed.content == plain.content


def test_wrk_runs_under_sched_fifo_where_permitted(tmp_path: Path) -> None:
    """--wrk-priority fifo runs wrk under SCHED_FIFO where the machine allows it, and says which it got."""
    from benchmarks import run

    result = _check(_quick(tmp_path, "--wrk-priority", "fifo"))
    fifo = shutil.which("wrk") is not None and bool(run.realtime_prefix())
    assert result["wrk_priority"] == ("fifo" if fifo else "normal")


def run_ab(*args: str) -> subprocess.CompletedProcess[str] | None:
    """One quick round of benchmarks/ab.py; None when wrk is missing and it said how to install it."""
    quick = ["--rounds", "1", "--duration", "1", "--warmup", "1", "--keys", "20"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab.py"), *quick, *args],  # args win over the defaults
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if shutil.which("wrk") is None:
        assert proc.returncode == 2
        assert "apt-get install -y wrk" in proc.stderr
        return None
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_ab_script_compares_two_variants_served_at_once() -> None:
    """benchmarks/ab.py serves both variants together and prints their cost ratio (or how to get wrk)."""
    proc = run_ab("create_bare", "create_metered")
    if proc is not None:
        assert "round 1: a " in proc.stdout
        assert "| steal " in proc.stdout
        assert "cost ratio a/b, median" in proc.stdout
        # The bare app has no resolver; the metered one, warmed over its 20 keys, looked none up.
        assert "| key lookups a/b -/0" in proc.stdout
        assert "not warm" not in proc.stdout


def test_ab_script_says_when_a_metered_server_measured_cache_misses() -> None:
    """Servers start cold each round: without a warm-up the metered one looks its keys up during the
    measured run, which the figures would silently include; the script says so."""
    proc = run_ab("create_bare", "create_metered", "--warmup", "0")
    if proc is not None:
        assert "| key lookups a/b -/20" in proc.stdout
        assert "looked up 20 keys in Redis during the measured runs" in proc.stdout


def test_ab_script_measures_several_runs_on_the_same_servers() -> None:
    """--runs measures one pair of servers again and again without restarting them (how a server's cost is
    followed as it keeps running): with no warm-up the first run looks the 20 keys up, and the second,
    on the same warm cache, none."""
    proc = run_ab("create_bare", "create_metered", "--warmup", "0", "--runs", "2")
    if proc is not None:
        assert "round 1 run 1: a " in proc.stdout
        assert "round 1 run 2: a " in proc.stdout
        first, second = (line for line in proc.stdout.splitlines() if line.startswith("round 1 run "))
        assert first.endswith("| key lookups a/b -/20")
        assert second.endswith("| key lookups a/b -/0")
        assert "2 runs: server CPU per request" in proc.stdout


def test_ab_script_passes_the_cache_ttl_to_the_metered_app() -> None:
    """--cache-ttl reaches the metered server: with no caching (0), its 20 keys are looked up again and
    again (concurrent requests for a key share a lookup), and the script says the figures include them."""
    proc = run_ab("create_bare", "create_metered", "--cache-ttl", "0")
    if proc is not None:
        lookups = int(proc.stdout.split("| key lookups a/b -/")[1].split()[0])
        assert lookups > 100  # a cache that kept its entries would look each of the 20 keys up once
        assert "entries that expired (--cache-ttl)" in proc.stdout


def test_ab_script_serves_a_variant_from_the_path_it_is_given(tmp_path: Path) -> None:
    """--b-path puts a directory first on b's import path (how two versions are compared side by side):
    here b's factory lives only there, so the run works only if the path reached b's server."""
    (tmp_path / "elsewhere_app.py").write_text(
        "from benchmarks.app import create_bare\n\ndef create():\n    return create_bare()\n"
    )
    proc = run_ab("create_bare", "elsewhere_app:create", "--b-path", str(tmp_path))
    if proc is not None:
        assert "cost ratio a/b, median" in proc.stdout


def test_steal_is_the_stolen_share_of_the_machines_ticks(tmp_path: Path) -> None:
    """The steal column reads /proc/stat's eighth field over the run, as a share of all its ticks."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import run
    finally:
        sys.path.remove(str(ROOT))
    assert run.steal_share((10, 1_000), (16, 1_200)) == pytest.approx(0.03)
    # A round measured again keeps the try whose worse run lost least, bare and metered together.
    load = run.Load(requests=1, seconds=1.0, p50_ms=1.0, p99_ms=1.0, non2xx=0, socket_errors=0)

    def pair(bare: float, metered: float) -> list[run.Sample]:
        return [run.Sample("bare", 1, load, steal=bare), run.Sample("metered", 1, load, steal=metered)]

    assert run.least_stolen([pair(0.01, 0.09), pair(0.05, 0.04), pair(0.0, 0.06)]) == 1
    assert run.least_stolen([pair(0.03, 0.0), pair(0.0, 0.03)]) == 0
    assert run.steal_share((5, 100), (5, 100)) == 0.0  # no time passed: no share, not a division by zero
    if Path("/proc/stat").exists():
        earlier = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
        stolen, total = run.machine_ticks()
        assert total >= sum(earlier)  # the counters only grow, and all eight fields are summed
        assert earlier[7] <= stolen <= total


def test_flusher_script_delivers_every_line_through_each_http_client() -> None:
    """``benchmarks/flusher.py`` with tiny settings: each transport delivers all the pending lines."""
    stdout = _script("flusher.py", "--targets", "30", "--sink", "meter_events")
    runs = re.findall(r"^meter_events +(\w+) +(\d+) lines in .* \(dead (\d+)\)", stdout, re.MULTILINE)
    assert runs == [("httpx", "30", "0"), ("aiohttp", "30", "0")], stdout
