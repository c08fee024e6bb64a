"""The middleware: who is admitted, what is counted, and how refusals look."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette

from metered_middleware import (
    BillingTarget,
    CallableResolver,
    CountStore,
    KeyRegistry,
    MeteringMiddleware,
    StaticResolver,
    _fastpath,
)
from metered_middleware._resolver import fingerprint
from tests.helpers import Lifespan, make_app, pending_totals, use_pure_python, websocket_session

pytestmark = pytest.mark.anyio

PATHS = ["python", *(["native"] if _fastpath.NATIVE else [])]


@pytest.fixture(params=PATHS, autouse=True)
def request_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on the compiled request path (where it is built) and on its Python twin."""
    if request.param == "python":
        use_pure_python(monkeypatch)
    return str(request.param)


NOW = int(time.time())
TARGET = BillingTarget(
    customer="cus_1",
    subscription="sub_1",
    subscription_item="si_1",
    meter_event_name="calls",
    period_start=NOW - 10,
    period_end=NOW + 3600,
)


class Harness:
    """A metered app, its registry and an HTTP client on it."""

    def __init__(self, metered: MeteringMiddleware, registry: KeyRegistry, redis: aioredis.Redis) -> None:
        self.metered = metered
        self.registry = registry
        self.redis = redis
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t")

    async def key(self, target: BillingTarget = TARGET) -> str:
        return (await self.registry.create(target)).key

    async def totals(self) -> dict[str, int]:
        await self.metered.flush()
        return await pending_totals(self.redis, self.metered.layout)


@pytest.fixture
async def harness(redis_client: aioredis.Redis) -> AsyncIterator[Harness]:
    metered = MeteringMiddleware(
        make_app(),
        redis=redis_client,
        environ={},
        route_weights=(),
        coalesce_window=0.01,
    )
    h = Harness(metered, KeyRegistry(redis_client), redis_client)
    yield h
    await h.http.aclose()
    await metered.aclose()


def make(redis_client: aioredis.Redis, **overrides: Any) -> Harness:
    metered = MeteringMiddleware(make_app(), redis=redis_client, environ={}, **overrides)
    return Harness(metered, KeyRegistry(redis_client), redis_client)


async def test_counts_each_successful_request_once(harness: Harness) -> None:
    """Every 2xx request is counted once against its key's target, by Bearer or X-API-Key."""
    key = await harness.key()
    for _ in range(7):
        assert (
            await harness.http.get("/v1/hello", headers={"Authorization": f"Bearer {key}"})
        ).status_code == 200
    for _ in range(3):
        assert (await harness.http.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
    assert await harness.totals() == {TARGET.target_id: 10}
    assert await harness.metered.store.period_usage(TARGET) == 10


async def test_handlers_see_the_billing_target(harness: Harness) -> None:
    """request.state.billing_target tells the handler who is calling."""
    issued = await harness.registry.create(TARGET)
    body = (await harness.http.get("/v1/hello", headers={"X-API-Key": issued.key})).json()
    assert body == {"customer": "cus_1", "key_id": issued.key_id}


async def test_excluded_paths_need_no_key_and_are_not_counted(harness: Harness) -> None:
    """Health checks pass without a key and cost nothing."""
    key = await harness.key()
    assert (await harness.http.get("/healthz")).status_code == 200
    assert (await harness.http.get("/healthz", headers={"X-API-Key": key})).status_code == 200
    assert await harness.totals() == {}


async def test_only_counted_statuses_count(redis_client: aioredis.Redis) -> None:
    """By default 2xx and 3xx count; 4xx and 5xx do not; the set is configurable."""
    h = make(redis_client, coalesce_window=0.01)
    key = await h.key()
    for code in (200, 201, 204, 301, 304, 400, 404, 429, 500, 503):
        r = await h.http.get(f"/v1/status/{code}", headers={"X-API-Key": key})
        assert r.status_code == code
    assert await h.totals() == {TARGET.target_id: 5}
    await h.metered.aclose()
    await h.http.aclose()
    await redis_client.flushdb()
    h2 = make(redis_client, coalesce_window=0.01, count_statuses=frozenset({200, 404}))
    key = await h2.key()
    for code in (200, 201, 404, 500):
        await h2.http.get(f"/v1/status/{code}", headers={"X-API-Key": key})
    assert await h2.totals() == {TARGET.target_id: 2}
    await h2.metered.aclose()
    await h2.http.aclose()


async def test_an_app_exception_is_not_counted(harness: Harness) -> None:
    """A request whose handler raises (a 500) is not billed."""
    key = await harness.key()
    transport = httpx.ASGITransport(app=harness.metered, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.get("/v1/boom", headers={"X-API-Key": key})
    assert r.status_code == 500
    assert await harness.totals() == {}


async def test_route_weights(redis_client: aioredis.Redis) -> None:
    """A matching route counts its weight; others count 1; weight 0 is free."""
    from metered_middleware import Settings

    s = Settings.from_env(
        {"METERED_ROUTE_WEIGHTS": "GET /v1/fonts/*/subset=5,POST /v1/fonts/*/subset=9,/v1/status/*=0"},
        coalesce_window=0.01,
    )
    h = make(redis_client, route_weights=s.route_weights, coalesce_window=0.01)
    key = await h.key()
    await h.http.get("/v1/fonts/roboto/subset", headers={"X-API-Key": key})
    await h.http.get("/v1/fonts/lato/subset", headers={"X-API-Key": key})
    await h.http.get("/v1/hello", headers={"X-API-Key": key})
    await h.http.get("/v1/status/200", headers={"X-API-Key": key})
    assert await h.totals() == {TARGET.target_id: 11}
    await h.metered.aclose()
    await h.http.aclose()


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["type"]
    assert body["error"]["message"]
    assert "Traceback" not in r.text
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_rejections_have_stable_codes(harness: Harness) -> None:
    """Missing, unknown, revoked and inactive keys get their JSON error and nothing is counted."""
    good = await harness.key()
    revoked = await harness.key()
    await harness.registry.revoke(revoked)
    canceled = await harness.key(BillingTarget(customer="cus_9", subscription="sub_9", status="canceled"))
    get = harness.http.get
    assert_error(await get("/v1/hello"), 401, "api_key_missing")
    assert_error(await get("/v1/hello", headers={"X-API-Key": "mk_unknown"}), 401, "api_key_invalid")
    assert_error(await get("/v1/hello", headers={"X-API-Key": revoked}), 401, "api_key_revoked")
    assert_error(await get("/v1/hello", headers={"X-API-Key": canceled}), 402, "subscription_inactive")
    for status in ("unpaid", "paused", "incomplete_expired"):
        k = await harness.key(BillingTarget(customer="cus_8", status=status))
        assert_error(await get("/v1/hello", headers={"X-API-Key": k}), 402, "subscription_inactive")
    assert (await get("/v1/hello", headers={"X-API-Key": good})).status_code == 200
    assert await harness.totals() == {TARGET.target_id: 1}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([("x-api-key", "")], "api_key_missing"),
        ([("authorization", "Bearer ")], "api_key_missing"),
        ([("x-api-key", "k" * 10_000)], "api_key_invalid"),
        ([("x-api-key", "key\x01ctl")], "api_key_invalid"),
        ([("x-api-key", "a"), ("x-api-key", "b")], "api_key_invalid"),
        ([("x-api-key", "a"), ("authorization", "Bearer b")], "api_key_invalid"),
        ([("authorization", "Basic Zm9vOmJhcg==")], "api_key_missing"),
    ],
)
async def test_hostile_input_never_500(harness: Harness, headers: list[tuple[str, str]], code: str) -> None:
    """Empty, huge, control-character and repeated keys get a 401 with a code, never a 500."""
    assert_error(await harness.http.get("/v1/hello", headers=headers), 401, code)


async def test_a_cached_key_gets_the_same_answers_as_a_cold_one(harness: Harness) -> None:
    """The inline path for cached keys leaves everything unusual to the general one: same codes, counts."""
    key = await harness.key()
    get = harness.http.get
    assert (await get("/v1/hello", headers={"X-API-Key": key})).status_code == 200  # now cached
    assert (await get("/v1/hello", headers={"Authorization": f"bearer  {key} "})).status_code == 200
    both = [("x-api-key", key), ("authorization", f"Bearer {key}")]
    assert (await get("/v1/hello", headers=both)).status_code == 200  # the same key twice is one key
    other = [("x-api-key", key), ("authorization", "Bearer mk_other")]
    assert_error(await get("/v1/hello", headers=other), 401, "api_key_invalid")  # ambiguous
    assert_error(await get("/v1/hello", headers={"Authorization": f"Basic {key}"}), 401, "api_key_missing")
    assert_error(await get("/v1/hello", headers={"X-API-Key": key + "\x01"}), 401, "api_key_invalid")
    assert harness.metered.rejected == {"api_key_ambiguous": 1, "api_key_missing": 1, "api_key_invalid": 1}
    assert await harness.totals() == {TARGET.target_id: 3}
    await harness.registry.revoke(key)
    harness.metered.resolver.invalidate(key)
    assert_error(await get("/v1/hello", headers={"X-API-Key": key}), 401, "api_key_revoked")


async def test_the_inline_path_checks_the_second_hash(harness: Harness) -> None:
    """A cache slot holding another key's target (a first-hash collision, planted) is not served inline."""
    key = await harness.key()
    first, second = fingerprint(key.encode())
    other = BillingTarget(customer="cus_other", subscription_item="si_other")
    harness.metered.resolver._entries[first] = (float("inf"), second ^ 1, other)
    assert (await harness.http.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
    assert await harness.totals() == {TARGET.target_id: 1}


async def test_non_ascii_key_bytes(harness: Harness) -> None:
    """Raw non-ASCII bytes in the key header get api_key_invalid."""
    r = await harness.http.get("/v1/hello", headers=[(b"x-api-key", "clé".encode())])
    assert_error(r, 401, "api_key_invalid")


async def test_keys_never_logged(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Neither good nor bad keys appear in any log record."""
    caplog.set_level(logging.DEBUG)
    key = await harness.key()
    await harness.http.get("/v1/hello", headers={"X-API-Key": key})
    await harness.http.get("/v1/hello", headers={"X-API-Key": "mk_guess_123"})
    await harness.metered.flush()
    assert key not in caplog.text
    assert "mk_guess_123" not in caplog.text


async def test_redis_down_closed_mode_refuses_with_503(redis_client: aioredis.Redis) -> None:
    """In closed mode, an unreachable Redis gets 503 metering_unavailable with Retry-After."""
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    metered = MeteringMiddleware(make_app(), redis=dead, environ={}, fail_mode="closed", retry_after=7)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as http:
        r = await http.get("/v1/hello", headers={"X-API-Key": "mk_whatever"})
    assert_error(r, 503, "metering_unavailable")
    assert r.headers["retry-after"] == "7"
    await metered.aclose()
    await dead.aclose()


async def test_zero_window_writes_before_the_response_completes(redis_client: aioredis.Redis) -> None:
    """With METERED_COALESCE_WINDOW=0 the count is in Redis when the client has its response."""
    h = make(redis_client, coalesce_window=0.0)
    key = await h.key()
    for i in range(1, 4):
        assert (await h.http.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
        assert await pending_totals(redis_client, h.metered.layout) == {TARGET.target_id: i}
    await h.metered.aclose()
    await h.http.aclose()


async def test_zero_window_keeps_a_count_redis_could_not_take(redis_client: aioredis.Redis) -> None:
    """With window 0, a request served while Redis fails is still counted once Redis answers again."""
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    metered = MeteringMiddleware(
        make_app(),
        redis=dead,
        environ={},
        coalesce_window=0.0,
        resolver=StaticResolver({"mk_any": TARGET}),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as http:
        assert (await http.get("/v1/hello", headers={"X-API-Key": "mk_any"})).status_code == 200
        assert (await http.get("/v1/hello", headers={"X-API-Key": "mk_any"})).status_code == 200
    assert metered.counter.stats.buffered_units == 2
    metered.counter.store = CountStore(redis_client, metered.layout)  # Redis is back
    await metered.aclose()
    assert await pending_totals(redis_client, metered.layout) == {TARGET.target_id: 2}
    await dead.aclose()


async def test_websocket_counted_once_per_accepted_connection(harness: Harness) -> None:
    """A websocket costs one unit when accepted, however many messages it carries; refusals close it."""
    key = await harness.key()
    for _ in range(2):
        sent = await websocket_session(harness.metered, "/v1/ws", [(b"x-api-key", key.encode())], ["a", "b"])
        assert sent[0]["type"] == "websocket.accept"
        assert sent[1] == {"type": "websocket.send", "text": "a", "bytes": None} or sent[1]["text"] == "a"
    refused = await websocket_session(harness.metered, "/v1/ws", [], ["a"])
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "api_key_missing"}]
    assert await harness.totals() == {TARGET.target_id: 2}


async def test_lifespan_passes_through_and_shutdown_flushes(redis_client: aioredis.Redis) -> None:
    """The app's own lifespan runs untouched, and buffered counts are written at shutdown."""
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("startup")
        yield {"from_lifespan": "yes"}
        events.append("shutdown")

    app = make_app()
    app.router.lifespan_context = lifespan
    # A long window: only the shutdown flush can have written the count.
    h = Harness(
        MeteringMiddleware(app, redis=redis_client, environ={}, coalesce_window=1.0),
        KeyRegistry(redis_client),
        redis_client,
    )
    key = await h.key()
    async with Lifespan(h.metered):
        assert (await h.http.get("/v1/hello", headers={"X-API-Key": key})).status_code == 200
        assert await pending_totals(redis_client, h.metered.layout) == {}
    assert events == ["startup", "shutdown"]
    assert await pending_totals(redis_client, h.metered.layout) == {TARGET.target_id: 1}
    await h.http.aclose()


async def test_a_failing_resolver_is_a_503_not_a_500(redis_client: aioredis.Redis) -> None:
    """Whatever a resolver raises reaches the caller as metering_unavailable, never a 500 or a traceback."""

    async def broken(key: str) -> BillingTarget | None:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    metered = MeteringMiddleware(
        make_app(), redis=redis_client, environ={}, resolver=CallableResolver(broken)
    )
    transport = httpx.ASGITransport(app=metered, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.get("/v1/hello", headers={"X-API-Key": "mk_any"})
    assert_error(r, 503, "metering_unavailable")
    await metered.aclose()
