"""The plan page starts a subscription-mode Checkout session and sends the browser to it."""

from __future__ import annotations

import pytest

from tests.examples.conftest import World, api

pytestmark = pytest.mark.anyio


async def test_choosing_a_plan_redirects_to_a_subscription_checkout(world: World) -> None:
    """POST /checkout with a plan creates a Checkout session for that plan's price and 303s to it."""
    app = world.app()
    async with api(app) as http:
        response = await http.post("/checkout", data={"plan": "growth"})
    assert response.status_code == 303
    sessions = (await world.client.v1.checkout.sessions.list_async({"limit": 10})).data
    (session,) = sessions
    assert response.headers["location"] == session.url
    assert session.mode == "subscription"
    assert session.to_dict()["metadata"] == {"typographic_plan": "growth"}
    assert session.success_url == "http://typographic/success?session_id={CHECKOUT_SESSION_ID}"


async def test_an_unknown_plan_is_refused(world: World) -> None:
    """Only the three plans can be bought."""
    app = world.app()
    async with api(app) as http:
        response = await http.post("/checkout", data={"plan": "platinum"})
    assert (response.status_code, response.json()["error"]["code"]) == (400, "plan_unknown")
