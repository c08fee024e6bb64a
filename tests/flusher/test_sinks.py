"""The v1 sinks' requests as Stripe receives them."""

from __future__ import annotations

import pytest

from metered_middleware._delivery import line_key
from metered_middleware._sinks import SendLine, make_sink, make_stripe_client

from .conftest import EVENT, World

pytestmark = pytest.mark.anyio


async def test_v1_lines_carry_their_key_as_idempotency_key_and_identifier(world: World) -> None:
    """Each v1 request sends the line's key as its idempotency key (and meter event identifier)."""
    if world.sink == "meter_event_stream":
        pytest.skip("the v2 stream deduplicates by identifier only")
    target = world.subscribe("keyed")
    key = line_key("mm", 0, 1, 1_700_000_000_000, 1, target.target_id)
    assert target.period_start is not None
    line = SendLine(
        target.target_id, target.customer, target.subscription_item, EVENT, 7, target.period_start, key
    )
    settings = world.settings()
    client, http = make_stripe_client(settings)
    try:
        outcomes = await make_sink(settings, client).send([line])
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert [o.kind for o in outcomes] == ["delivered"]
    sent = [r for r in world.emu.requests() if r.operation == f"{world.sink}.create"]
    assert [r.idempotency_key for r in sent] == [key]
    if world.sink == "meter_events":
        assert sent[0].params["identifier"] == key
        assert sent[0].params["payload"] == {"stripe_customer_id": target.customer, "value": "7"}
    assert world.stripe_total(target) == 7
