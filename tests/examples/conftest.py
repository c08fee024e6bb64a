"""The Typographic example wired to the session's Redis and the Stripe emulator, and a uvicorn runner."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
import stripe
import uvicorn

from examples.typographic.app import Typographic, example_settings
from examples.typographic.billing import StripeSetup, setup_stripe
from examples.typographic.fonts import FontLibrary
from examples.typographic.plans import METER_EVENT_NAME
from metered_middleware import BillingTarget
from metered_middleware._delivery_config import DeliverySettings, SinkName
from metered_middleware.testing.emulator import StripeEmulator

WEBHOOK_SECRET = "whsec_typographic_tests"


@pytest.fixture(scope="session")
def fonts() -> FontLibrary:
    """The font packages installed with the example extra, read once."""
    return FontLibrary.discover()


@dataclass
class World:
    """Redis, the emulator with the plans set up, and a way to build the app on them."""

    redis: aioredis.Redis
    redis_url: str
    emulator: StripeEmulator
    client: stripe.StripeClient
    setup: StripeSetup
    fonts: FontLibrary
    sink: SinkName = "meter_events"
    apps: list[Typographic] = field(default_factory=list)

    @property
    def legacy(self) -> bool:
        """Whether the world bills through usage records, so Checkout subscribes to the legacy prices."""
        return self.sink == "usage_records"

    def app(self, environ: Mapping[str, str] | None = None, *, deliver: bool = False) -> Typographic:
        """The example app; with ``deliver`` its lifespan runs the flusher against the emulator."""
        delivery = None
        if deliver:
            delivery = DeliverySettings(
                stripe_api_key="sk_test_emulator",
                redis_url=self.redis_url,
                api_base=self.emulator.url,
                sink=self.sink,
                meter_event_name=METER_EVENT_NAME,
                rate_limit=0.0,
                flush_interval=3600.0,  # the tests flush when they mean to
            )
        app = Typographic(
            redis=self.redis,
            settings=example_settings(environ or {}, redis_url=self.redis_url),
            stripe_client=self.client,
            webhook_secret=WEBHOOK_SECRET,
            prices=self.setup.legacy_prices if self.legacy else self.setup.prices,
            delivery=delivery,
            fonts=self.fonts,
        )
        self.apps.append(app)
        return app

    async def key(self, plan: str = "standard", **fields: object) -> str:
        """A key issued straight into the registry, for tests that do not go through Checkout."""
        target = BillingTarget(
            customer=f"cus_{plan}",
            subscription_item=f"si_{plan}",
            subscription=f"sub_{plan}",
            meter_event_name=METER_EVENT_NAME,
            period_start=1_700_000_000,
            period_end=4_000_000_000,
            plan=plan,
            **fields,  # type: ignore[arg-type]
        )
        issued = await self.apps[-1].registry.create(target)
        return issued.key


@pytest.fixture
def sink() -> SinkName:
    """The flusher's sink in a world; a test parametrizes ``sink`` to bill through another one."""
    return "meter_events"


@pytest.fixture
async def world(
    redis_client: aioredis.Redis,
    redis_url: str,
    stripe_emulator: StripeEmulator,
    fonts: FontLibrary,
    sink: SinkName,
) -> AsyncIterator[World]:
    """A fresh world per test; every app built in it has its middleware closed afterwards.

    With the ``usage_records`` sink the legacy metered prices are set up too and the app subscribes to them.
    """
    client = stripe_emulator.client()
    setup = await setup_stripe(client, legacy=sink == "usage_records")
    found = World(redis_client, redis_url, stripe_emulator, client, setup, fonts, sink)
    try:
        yield found
    finally:
        for app in found.apps:
            await app.metered.aclose()


def api(app: Typographic, key: str | None = None) -> httpx.AsyncClient:
    """An in-process client for the app, authenticated with ``key``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://typographic", headers=headers
    )


@asynccontextmanager
async def serving(app: Typographic) -> AsyncIterator[str]:
    """Serve the app under a real uvicorn server (lifespan on) on a free port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", log_config=None)
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            while not server.started:  # noqa: ASYNC110 - uvicorn only exposes a flag
                await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
    finally:
        sock.close()
