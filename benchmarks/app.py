"""The app the benchmark serves: a small font-API-like JSON service, bare or with the full metering stack.

``create_bare`` and ``create_metered`` are uvicorn factories (``--factory benchmarks.app:create_metered``).
Both serve the same routes and the same bytes; the metered one adds ``MeteringMiddleware`` (Redis key registry
behind the in-process resolver cache, coalesced counting) and runs the flusher in its lifespan, billing the
counts through the Stripe emulator. ``benchmarks/run.py`` sets these variables for the server processes:

- ``MM_BENCH_REDIS_URL``: the Redis the middleware and the flusher use (required for the metered app);
- ``MM_BENCH_STRIPE_URL``: the emulator's base URL (required for the metered app);
- ``MM_BENCH_SINK`` (``meter_events``), ``MM_BENCH_HTTP_CLIENT`` (``httpx``), ``MM_BENCH_STRIPE_RATE``
  (``auto``: Stripe's test budget, 20/s),
  ``MM_BENCH_FLUSH_INTERVAL`` (``5``), ``MM_BENCH_COALESCE_WINDOW`` (``0.05``), ``MM_BENCH_CACHE_TTL``
  (``60``, the resolver cache's TTL), ``MM_BENCH_IN_APP_FLUSHER`` (``1``; ``0`` leaves the flusher out, to
  tell its cost from the middleware's).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from metered_middleware import MeteringMiddleware
from metered_middleware._delivery_config import DeliverySettings

__all__ = ["FAMILIES", "METER_EVENT_NAME", "HeaderOnly", "create_bare", "create_floor", "create_metered"]

METER_EVENT_NAME: Final = "font_api_requests"
# A handful of families with the metadata a font API answers with; the responses are a few hundred bytes.
FAMILIES: Final[dict[str, dict[str, Any]]] = {
    slug: {
        "family": name,
        "slug": slug,
        "category": category,
        "variants": ["regular", "italic", "700", "700italic"],
        "subsets": ["latin", "latin-ext", "cyrillic"],
        "version": "v3.019",
        "files": {f: f"https://fonts.example.com/{slug}/{slug}-regular.{f}" for f in ("woff2", "ttf")},
    }
    for slug, name, category in (
        ("inter", "Inter", "sans-serif"),
        ("roboto-slab", "Roboto Slab", "serif"),
        ("jetbrains-mono", "JetBrains Mono", "monospace"),
        ("lora", "Lora", "serif"),
        ("work-sans", "Work Sans", "sans-serif"),
    )
}
_LISTING: Final = {"data": [{"slug": f["slug"], "family": f["family"]} for f in FAMILIES.values()]}


async def list_fonts(request: Request) -> JSONResponse:
    """GET /v1/fonts: the catalogue."""
    return JSONResponse(_LISTING)


async def get_font(request: Request) -> JSONResponse:
    """GET /v1/fonts/{slug}: one family's metadata, or a 404."""
    family = FAMILIES.get(request.path_params["slug"])
    if family is None:
        return JSONResponse({"error": {"code": "font_not_found"}}, 404)
    return JSONResponse(family)


async def health(request: Request) -> JSONResponse:
    """GET /health: unmetered (the middleware's default exclusions), used to wait for the server."""
    return JSONResponse({"ok": True})


ROUTES: Final = [
    Route("/health", health),
    Route("/v1/fonts", list_fonts),
    Route("/v1/fonts/{slug}", get_font),
]


def _gc_stats(variant: str) -> None:
    """With ``MM_BENCH_GC_STATS=<dir>``: time spent in each GC generation, written there at exit."""
    if os.environ.get("MM_BENCH_GC_FREEZE") == "1":  # an experiment: startup objects out of the collector
        gc.freeze()
    where = os.environ.get("MM_BENCH_GC_STATS")
    if not where:
        return
    totals = [[0, 0.0, 0] for _ in range(3)]  # collections, seconds, longest (ns)
    started = [0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter_ns()
            return
        took = time.perf_counter_ns() - started[0]
        row = totals[info["generation"]]
        row[0] += 1
        row[1] += took / 1e9
        row[2] = max(row[2], took)
        if started[0] - written[0] > 1e9:  # atexit does not run when uvicorn is stopped: write each second
            written[0] = started[0]
            write()

    written = [0]

    def write() -> None:
        line = " ".join(
            f"gen{g}: {c} x, {s * 1e3:.1f} ms, max {m / 1e6:.2f} ms" for g, (c, s, m) in enumerate(totals)
        )
        with open(os.path.join(where, f"{variant}-{os.getpid()}.txt"), "w") as f:
            f.write(f"{variant} objects {len(gc.get_objects())} {line}\n")

    gc.callbacks.append(callback)


def create_bare() -> Starlette:
    """The app alone."""
    _gc_stats("bare")
    return Starlette(routes=ROUTES)


class HeaderOnly:
    """The floor the benchmark issue names: a pure ASGI middleware that only reads the key header.

    It does what every metering middleware must before anything else (scan the request's headers for the
    key) and nothing more: no lookup, no counting. Metered against it, the difference is metering's own.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                # The benchmark's requests carry `Authorization: Bearer <key>`.
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    scope.setdefault("state", {})["api_key_length"] = len(value) - 7
                    break
        await self.app(scope, receive, send)


def create_floor() -> HeaderOnly:
    """The app behind ``HeaderOnly``: the floor a metering middleware approaches."""
    _gc_stats("floor")
    return HeaderOnly(Starlette(routes=ROUTES))


def delivery_settings(environ: Mapping[str, str]) -> DeliverySettings:
    """The in-app flusher's settings, pointed at the emulator."""
    stripe_url = environ["MM_BENCH_STRIPE_URL"]
    rate = environ.get("MM_BENCH_STRIPE_RATE", "auto")
    return DeliverySettings(
        stripe_api_key="sk_test_benchmark",
        redis_url=environ["MM_BENCH_REDIS_URL"],
        api_base=stripe_url,
        meter_events_base=stripe_url,
        sink=environ.get("MM_BENCH_SINK", "meter_events"),  # type: ignore[arg-type]  # validated by the class
        http_client=environ.get("MM_BENCH_HTTP_CLIENT", "httpx"),  # type: ignore[arg-type]  # validated too
        meter_event_name=METER_EVENT_NAME,
        rate_limit=None if rate == "auto" else float(rate),
        flush_interval=float(environ.get("MM_BENCH_FLUSH_INTERVAL", "5")),
        shutdown_grace=2.0,
    )


def create_metered(environ: Mapping[str, str] | None = None) -> MeteringMiddleware:
    """The same app behind the full stack: middleware, cached Redis resolver, coalesced counts, flusher."""
    env = os.environ if environ is None else environ
    _gc_stats("metered")
    delivery = delivery_settings(env)

    in_app_flusher = env.get("MM_BENCH_IN_APP_FLUSHER", "1") != "0"  # 0: to tell the two costs apart

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not in_app_flusher:
            yield
            return
        # Imported here, as the package itself does: a server whose flusher is its own process never loads
        # the Stripe SDK and the HTTP clients (a third of its heap, walked by every full collection).
        from metered_middleware._flusher import Flusher

        async with Flusher(delivery) as flusher, anyio.create_task_group() as tg:
            await tg.start(flusher.run)
            try:
                yield
            finally:
                flusher.stop()

    async def lookups(request: Request) -> JSONResponse:
        # Unmetered (under /health): run.py reads it around each measured run for the key lookups the
        # resolver made, which Redis's command counts cannot tell from the flusher's own HGETALLs.
        return JSONResponse({"lookups": middleware.resolver.lookups})

    middleware = MeteringMiddleware(
        Starlette(routes=[*ROUTES, Route("/health/lookups", lookups)], lifespan=lifespan),
        environ={},
        redis_url=env["MM_BENCH_REDIS_URL"],
        coalesce_window=float(env.get("MM_BENCH_COALESCE_WINDOW", "0.05")),
        cache_ttl=float(env.get("MM_BENCH_CACHE_TTL", "60")),
    )
    return middleware
