"""Issue 7: every delivery decision is logged as structured JSON fields an auditor can filter on."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from metered_middleware._flusher import Flusher
from metered_middleware._logging import configure_logging

from .conftest import World

pytestmark = pytest.mark.anyio


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The library's logs as JSON lines, debug level included (delivered lines log at debug)."""
    root = logging.getLogger("metered_middleware")
    level, propagate = root.level, root.propagate
    buffer = io.StringIO()
    handler = configure_logging(fmt="json", level="DEBUG", stream=buffer)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        root.propagate = propagate


def _records(buffer: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, buffer.getvalue().splitlines()) if r.get("event") == event]


@pytest.mark.parametrize("world", ["usage_records", "meter_events"], indirect=True)
async def test_delivered_retried_and_dead_lettered_lines_log_their_audit_fields(
    world: World, json_logs: io.StringIO
) -> None:
    """A line retried after an injected 500 logs the retry and then its delivery with the same key; a
    line Stripe refuses for good logs its dead-letter with Stripe's error; no API key appears anywhere."""
    good = world.subscribe("good")
    await world.count([(good, 3)])
    world.emu.inject("*", "500", times=1)
    async with Flusher(world.settings()) as flusher:
        report = await flusher.flush_once()
    assert report.delivered == 1

    [retry] = _records(json_logs, "retry")
    assert retry["target"] == good.target_id
    assert (retry["outcome"], retry["reason"], retry["stripe_status"]) == ("retry", "server_error", 500)
    assert retry["level"] == "info"
    assert retry["units"] == 3
    assert retry["sink"] == world.sink
    [delivered] = _records(json_logs, "delivered")
    assert delivered["target"] == good.target_id
    assert (delivered["outcome"], delivered["units"], delivered["send"]) == ("delivered", 3, 2)
    # The retry sent the stamp stored once: same attempt, timestamp and idempotency key (= identifier).
    for name in ("attempt", "idempotency_key", "timestamp", "shard", "seq"):
        assert delivered[name] == retry[name], name
    assert delivered["attempt"] == 1
    assert isinstance(delivered["timestamp"], int)
    assert delivered["idempotency_key"]

    bad = world.subscribe("bad")
    world.make_unbillable(bad)
    await world.count([(bad, 5)])
    async with Flusher(world.settings()) as flusher:
        report = await flusher.flush_once()
    assert report.dead == 1

    [dead] = _records(json_logs, "dead_lettered")
    assert dead["level"] == "error"
    assert dead["target"] == bad.target_id
    assert (dead["outcome"], dead["reason"], dead["units"], dead["attempt"]) == ("dead", "refused", 5, 1)
    assert dead["stripe_status"] in (400, 404)
    assert dead["stripe_error_type"] == "invalid_request_error"
    assert dead["stripe_message"]
    assert dead["idempotency_key"]
    assert isinstance(dead["timestamp"], int)
    assert "stripe_code" in dead or world.sink == "meter_events"
    assert "sk_test_emulator" not in json_logs.getvalue()
