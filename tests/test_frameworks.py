"""The three-line integration works under FastAPI as it does under Starlette."""

from __future__ import annotations

import time

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI, Request

from metered_middleware import BillingTarget, KeyRegistry, MeteringMiddleware
from metered_middleware._layout import Layout
from tests.helpers import pending_totals

pytestmark = pytest.mark.anyio


async def test_fastapi_add_middleware(
    redis_client: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`app.add_middleware(MeteringMiddleware)` with settings from the environment meters a FastAPI app."""
    monkeypatch.setenv("METERED_REDIS_URL", redis_url)
    monkeypatch.setenv("METERED_COALESCE_WINDOW", "0")
    now = int(time.time())
    target = BillingTarget(customer="cus_f", subscription_item="si_f", period_start=now, period_end=now + 60)
    key = (await KeyRegistry(redis_client).create(target)).key

    app = FastAPI()
    app.add_middleware(MeteringMiddleware)

    @app.get("/v1/me")
    async def me(request: Request) -> dict[str, str]:
        return {"customer": request.state.billing_target.customer}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        ok = await http.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
        refused = await http.get("/v1/me")
        docs = await http.get("/openapi.json")
    assert ok.json() == {"customer": "cus_f"}
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_missing"
    assert docs.status_code == 200  # excluded by default: docs need no key
    assert await pending_totals(redis_client, Layout("mm", 4)) == {target.target_id: 1}
