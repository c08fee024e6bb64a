"""The flusher end to end against real Redis and the Stripe emulator, for every sink."""

from __future__ import annotations

import pytest

from metered_middleware._flusher import Flusher

from .conftest import World

pytestmark = pytest.mark.anyio


async def test_counted_usage_reaches_stripe_exactly(world: World) -> None:
    """Every counted unit is recorded by Stripe once, and nothing stays pending."""
    targets = [world.subscribe(f"c{i}") for i in range(5)]
    await world.count([(t, i + 1) for i, t in enumerate(targets)])
    await world.count([(targets[0], 10)])
    async with Flusher(world.settings()) as flusher:
        report = await flusher.flush_once()
    assert report.complete
    assert report.delivered == 5
    await world.assert_exact()
