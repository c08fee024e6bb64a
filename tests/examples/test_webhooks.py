"""Stripe webhooks: only signed, fresh events change anything; Checkout issues a key shown once."""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import anyio
import httpx
import pytest

from examples.typographic.app import Typographic
from examples.typographic.billing import create_checkout_session
from examples.typographic.plans import STANDARD
from metered_middleware.testing.emulator import sign
from tests.examples.conftest import WEBHOOK_SECRET, World, api

pytestmark = pytest.mark.anyio


async def _completed_checkout(world: World) -> dict[str, Any]:
    """A Checkout session the emulator completed (no webhook sent): the object a webhook would carry."""
    session = await create_checkout_session(
        world.client,
        STANDARD,
        world.setup.price_for(STANDARD),
        success_url="http://typographic/success?session_id={CHECKOUT_SESSION_ID}",
        cancel_url="http://typographic/",
    )
    await anyio.to_thread.run_sync(functools.partial(world.emulator.complete_checkout, session.id))
    completed = await world.client.v1.checkout.sessions.retrieve_async(session.id)
    return completed.to_dict()


def _event(kind: str, obj: dict[str, Any], event_id: str = "evt_test_1") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "api_version": "2025-09-30",
            "data": {"object": obj},
        }
    ).encode()


async def _post(app: Typographic, payload: bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with api(app) as http:
        return await http.post("/stripe/webhook", content=payload, headers=headers)


async def _snapshot(world: World) -> dict[Any, Any]:
    return {key: await world.redis.dump(key) for key in await world.redis.keys("*")}


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("missing", "signature_missing"),
        ("wrong_secret", "signature_invalid"),
        ("stale", "signature_invalid"),
        ("tampered", "signature_invalid"),
    ],
)
async def test_unverifiable_webhooks_get_400_and_change_nothing(world: World, case: str, code: str) -> None:
    """Missing, forged, replayed-too-late or altered events are refused before anything is touched."""
    app = world.app()
    payload = _event("checkout.session.completed", await _completed_checkout(world))
    signature: str | None = {
        "missing": None,
        "wrong_secret": sign(payload, "whsec_someone_else"),
        "stale": sign(payload, WEBHOOK_SECRET, timestamp=int(time.time()) - 600),
        "tampered": sign(payload.replace(b"subscription", b"subscriptioN", 1), WEBHOOK_SECRET),
    }[case]
    before = await _snapshot(world)
    response = await _post(app, payload, signature)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert await _snapshot(world) == before
    assert await app.registry.list() == []


async def test_checkout_completed_issues_one_key_shown_once(world: World) -> None:
    """A verified checkout.session.completed issues a working key; the success page shows it only once."""
    app = world.app()
    session = await _completed_checkout(world)
    payload = _event("checkout.session.completed", session)
    first = await _post(app, payload, sign(payload, WEBHOOK_SECRET))
    again = await _post(app, payload, sign(payload, WEBHOOK_SECRET))  # Stripe delivers at least once
    assert first.json()["outcome"] == "key_issued"
    assert again.json()["outcome"] == "duplicate"
    (record,) = await app.registry.list()
    assert record.target.customer == session["customer"]
    assert record.target.plan == "standard"
    assert record.target.subscription == session["subscription"]

    async with api(app) as http:
        shown = await http.get("/success", params={"session_id": session["id"]})
        shown_again = await http.get(
            "/success", params={"session_id": session["id"]}, headers={"Accept": "application/json"}
        )
    key = shown.text.split("<pre>")[1].split("</pre>")[0]
    assert key.startswith("mk_")
    assert shown.headers["cache-control"] == "no-store"
    assert (shown_again.status_code, shown_again.json()["error"]["code"]) == (410, "key_unavailable")
    # Once shown, the plain key exists nowhere in Redis: only its hash is kept.
    assert not any(key.encode() in (value or b"") for value in (await _snapshot(world)).values())

    async with api(app, key) as http:
        assert (await http.get("/v1/fonts")).status_code == 200


async def test_subscription_deleted_refuses_the_customer(world: World) -> None:
    """customer.subscription.deleted marks the keys canceled: the next call gets 402 subscription_inactive."""
    app = world.app()
    session = await _completed_checkout(world)
    payload = _event("checkout.session.completed", session)
    await _post(app, payload, sign(payload, WEBHOOK_SECRET))
    async with api(app) as http:
        key = (
            await http.get(
                "/success", params={"session_id": session["id"]}, headers={"Accept": "application/json"}
            )
        ).json()["api_key"]
    async with api(app, key) as http:
        assert (await http.get("/v1/fonts")).status_code == 200  # now cached in the middleware
        subscription = (await world.client.v1.subscriptions.retrieve_async(session["subscription"])).to_dict()
        deleted = _event("customer.subscription.deleted", subscription | {"status": "canceled"}, "evt_test_2")
        outcome = await _post(app, deleted, sign(deleted, WEBHOOK_SECRET))
        refused = await http.get("/v1/fonts")
    assert outcome.json()["outcome"] == "keys_updated:1"
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "subscription_inactive"
