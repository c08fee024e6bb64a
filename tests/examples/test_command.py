"""``python -m examples.typographic``: one command on embedded defaults, and an idempotent setup-stripe."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

import examples.typographic.__main__ as command
from examples.typographic.plans import PLANS
from metered_middleware._redis_server import free_port
from metered_middleware.testing.emulator import StripeEmulator

ROOT = Path(__file__).resolve().parents[2]


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """The process's output, line by line, read in a thread so a hung process cannot hang the test."""
    out: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)
        out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return out


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_one_command_starts_on_embedded_defaults_and_prints_working_keys(stop: signal.Signals) -> None:
    """With no REDIS_URL or STRIPE_API_KEY it starts Redis and the emulator, signs up three customers,
    prints keys that work, and stops everything on Ctrl-C or SIGTERM (what a container runtime sends),
    exiting 0 without a traceback."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "STRIPE_API_KEY")}
    env.update(PORT=str(port), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.typographic"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _lines(proc)
        seen: list[str] = []
        while not any("Press Ctrl-C" in line for line in seen):
            line = lines.get(timeout=60)
            assert line is not None, "".join(seen)
            seen.append(line)
        output = "".join(seen)
        keys = re.findall(r"^  (Standard|Growth|Enterprise)\s+(cus_\w+)\s+(mk_\S+)$", output, re.MULTILINE)
        assert [plan for plan, _, _ in keys] == ["Standard", "Growth", "Enterprise"]
        assert f'curl -H "Authorization: Bearer {keys[0][2]}" http://127.0.0.1:{port}/v1/fonts' in output
        redis_port = int(re.findall(r"embedded redis-server at redis://127.0.0.1:(\d+)/0", output)[0])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            response = http.get("/v1/fonts", headers={"Authorization": f"Bearer {keys[1][2]}"})
        assert response.status_code == 200

        proc.send_signal(stop)
        assert proc.wait(timeout=30) == 0
        rest = []
        while (line := lines.get(timeout=10)) is not None:
            rest.append(line)
        assert "Traceback" not in "".join(rest), "".join(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # The embedded Redis went down with the app.
    with pytest.raises(httpx.ConnectError), httpx.Client() as http:
        http.get(f"http://127.0.0.1:{redis_port}")


# setup-stripe uses the SDK's own HTTPXClient, which posts raw ``data=`` that httpx deprecates.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_setup_stripe_is_idempotent_by_lookup_keys(
    stripe_emulator: StripeEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second setup-stripe finds the meter, products and prices (legacy ones too) and creates nothing."""
    env = {
        "STRIPE_API_KEY": "sk_test_emulator",
        "METERED_STRIPE_API_BASE": stripe_emulator.url,
        "METERED_SINK": "usage_records",
    }
    assert command.main(["setup-stripe"], env) == 0
    first = capsys.readouterr().out
    assert command.main(["setup-stripe"], env) == 0
    second = capsys.readouterr().out
    assert "created 10 object(s)" in first  # the meter, three products, three prices and three legacy prices
    assert second.endswith("created 0 object(s)\n")
    assert first.splitlines()[:4] == second.splitlines()[:4]
    client = stripe_emulator.client()
    prices = client.v1.prices.list({"lookup_keys": [p.lookup_key for p in PLANS]}).data
    assert sorted(p.tiers_mode or "" for p in prices) == ["graduated"] * 3
    assert {p.recurring.meter for p in prices if p.recurring} != {None}


def test_setup_stripe_needs_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    """Without STRIPE_API_KEY setup-stripe explains what to set and exits 2."""
    assert command.main(["setup-stripe"], {}) == 2
    assert "STRIPE_API_KEY" in capsys.readouterr().err
