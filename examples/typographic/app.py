"""The Typographic font API: a Starlette app, metered by ``MeteringMiddleware``, billed by the flusher.

Every ``/v1`` call is metered (a subset counts 5 units); the sign-up pages and the Stripe webhook are not.
``Typographic`` is the ASGI app to serve: it keeps the middleware instance at hand so the app can flush
counts, read usage and drop cached keys when a webhook changes a subscription.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qs

import anyio
import redis.asyncio as aioredis
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from examples.typographic.billing import create_checkout_session
from examples.typographic.fonts import MAX_SUBSET_TEXT, Flavor, FontLibrary
from examples.typographic.plans import METER_EVENT_NAME, PLANS, Plan, plan_by_key
from examples.typographic.webhooks import Onboarding
from metered_middleware import BillingTarget, KeyRegistry, MeteringMiddleware, RouteWeight, Settings
from metered_middleware._delivery import DeliveryStore
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._flusher import Flusher
from metered_middleware._layout import Layout
from metered_middleware._lifespan import flusher_lifespan
from metered_middleware._store import CountStore

__all__ = ["SITE_PATHS", "SUBSET_WEIGHT", "Typographic", "example_settings"]

# Pages people and Stripe reach without an API key; everything under /v1 is metered.
SITE_PATHS: Final = ("/", "/checkout", "/success", "/stripe/webhook")
SUBSET_WEIGHT: Final = 5
# How long the success page waits for the webhook that issues the key (they race after Checkout).
REVEAL_WAIT: Final = 10.0


def example_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """``Settings.from_env`` plus what the example needs: its site pages unmetered, subsets weighing 5."""
    settings = Settings.from_env(environ, **overrides)
    weights = settings.route_weights
    if not any(w.pattern == "/v1/fonts/*/subset" for w in weights):
        weights = (*weights, RouteWeight("GET", "/v1/fonts/*/subset", SUBSET_WEIGHT))
    return settings.replace(
        exclude_paths=tuple(dict.fromkeys((*settings.exclude_paths, *SITE_PATHS))),
        route_weights=weights,
    )


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": "invalid_request_error", "code": code, "message": message}}, status
    )


def _dollars(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


class Typographic:
    """The example app. Serve the instance; ``metered`` is the middleware, ``starlette`` the routes.

    ``prices`` maps plan keys to the Stripe prices Checkout subscribes to (``setup_stripe`` makes them).
    With ``delivery`` settings the flusher runs inside the app's lifespan and bills what was counted.
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        settings: Settings,
        stripe_client: stripe.StripeClient,
        webhook_secret: str,
        prices: Mapping[str, str],
        delivery: DeliverySettings | None = None,
        fonts: FontLibrary | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.stripe = stripe_client
        self.prices = dict(prices)
        self.delivery = delivery
        self.fonts = fonts or FontLibrary.discover()
        layout = Layout(settings.namespace, settings.shards)
        self.counts = CountStore(redis, layout)
        self.deliveries = DeliveryStore(redis, layout)
        self.registry = KeyRegistry(
            redis, namespace=settings.namespace, pepper=settings.key_pepper, key_prefix=settings.key_prefix
        )
        self.flusher: Flusher | None = None
        self.starlette = Starlette(
            routes=[
                Route("/", self.home),
                Route("/checkout", self.checkout, methods=["POST"]),
                Route("/success", self.success),
                Route("/stripe/webhook", self.webhook, methods=["POST"]),
                Route("/healthz", self.health),
                Route("/v1/fonts", self.list_families),
                Route("/v1/fonts/{family}", self.family),
                Route("/v1/fonts/{family}/subset", self.subset),
                Route("/v1/fonts/{family}/{file}", self.font_file),
                Route("/v1/css", self.css),
                Route("/v1/usage", self.usage),
            ],
            # With delivery settings the flusher runs beside the app, with a last flush at shutdown (the
            # middleware has written its buffered counts by then: it watches the same lifespan).
            # (flusher_lifespan is typed Mapping | None; Starlette wants one or the other: reported.)
            lifespan=flusher_lifespan(delivery, flusher=self._flusher) if delivery is not None else None,  # type: ignore[arg-type]
        )
        self.metered = MeteringMiddleware(self.starlette, settings=settings, redis=redis)
        # The meter event sinks need the event name; usage records bill the subscription item instead.
        self.legacy = delivery is not None and delivery.sink == "usage_records"
        meter_event = None if self.legacy else METER_EVENT_NAME
        self.onboarding = Onboarding(
            redis=redis,
            registry=self.registry,
            stripe_client=stripe_client,
            webhook_secret=webhook_secret,
            namespace=settings.namespace,
            meter_event_name=meter_event,
            on_change=self.metered.resolver.invalidate,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.metered(scope, receive, send)

    def _flusher(self, settings: DeliverySettings) -> Flusher:
        """The flusher ``flusher_lifespan`` runs, sharing the app's Redis client and kept for ``flush()``."""
        self.flusher = Flusher(settings, redis=self.redis)
        return self.flusher

    async def flush(self) -> None:
        """Write buffered counts to Redis and, when the flusher runs, deliver everything pending to Stripe."""
        await self.metered.flush()
        if self.flusher is not None:
            await self.flusher.flush_once()

    # -- sign-up ---------------------------------------------------------------------------------------------
    async def home(self, request: Request) -> HTMLResponse:
        """The three plans, each a button that starts a Checkout session."""
        cards = "".join(_plan_card(plan) for plan in PLANS)
        return HTMLResponse(_page("Typographic: fonts by the request", f'<div class="plans">{cards}</div>'))

    async def checkout(self, request: Request) -> Response:
        """Create a subscription-mode Checkout session for the chosen plan and redirect to it."""
        # The form has one urlencoded field; parsing it here spares the python-multipart dependency.
        form = parse_qs((await request.body()).decode("latin-1"))
        plan = plan_by_key(form.get("plan", [""])[0])
        if plan is None or plan.key not in self.prices:
            return _error(400, "plan_unknown", "Choose standard, growth or enterprise.")
        base = str(request.base_url).rstrip("/")
        session = await create_checkout_session(
            self.stripe,
            plan,
            self.prices[plan.key],
            success_url=f"{base}/success?session_id={{CHECKOUT_SESSION_ID}}",
            cancel_url=f"{base}/",
            legacy=self.legacy,
        )
        return RedirectResponse(str(session.url), status_code=303)

    async def success(self, request: Request) -> Response:
        """Show the new API key, once. ``Accept: application/json`` gets ``{"api_key": ...}``."""
        session_id = request.query_params.get("session_id", "")
        wants_json = "application/json" in request.headers.get("accept", "")
        if not session_id.startswith("cs_"):
            return _error(400, "session_missing", "The success page needs ?session_id=cs_...")
        key = await self.onboarding.reveal(session_id)
        with anyio.move_on_after(REVEAL_WAIT):
            while key is None and not await self.onboarding.was_revealed(session_id):
                await anyio.sleep(0.1)
                key = await self.onboarding.reveal(session_id)
        if key is None:
            revealed = await self.onboarding.was_revealed(session_id)
            message = (
                "This key was already shown; keys are stored hashed and cannot be shown again."
                if revealed
                else "No key yet: the Stripe webhook has not arrived. Reload in a moment."
            )
            if wants_json:
                return _error(410 if revealed else 404, "key_unavailable", message)
            return HTMLResponse(
                _page("No key to show", f"<p>{html.escape(message)}</p>"), 410 if revealed else 404
            )
        if wants_json:
            return JSONResponse({"api_key": key})
        base = html.escape(str(request.base_url).rstrip("/"))
        body = (
            "<p>Your API key, shown this once (we keep only its hash):</p>"
            f"<pre>{html.escape(key)}</pre>"
            f"<p>Try it:</p><pre>curl -H 'Authorization: Bearer {html.escape(key)}' {base}/v1/fonts</pre>"
        )
        return HTMLResponse(_page("Welcome to Typographic", body), headers={"Cache-Control": "no-store"})

    async def webhook(self, request: Request) -> Response:
        """``POST /stripe/webhook``: see ``Onboarding.endpoint``."""
        return await self.onboarding.endpoint(request)

    async def health(self, request: Request) -> JSONResponse:
        """Liveness (unmetered by the middleware's default exclusions)."""
        return JSONResponse({"ok": True})

    # -- the font API ----------------------------------------------------------------------------------------
    async def list_families(self, request: Request) -> JSONResponse:
        """``GET /v1/fonts``: every family."""
        return JSONResponse({"data": [f.summary() for f in self.fonts.families.values()]})

    async def family(self, request: Request) -> JSONResponse:
        """``GET /v1/fonts/{family}``: styles, glyph count and license."""
        found = self.fonts.family(request.path_params["family"])
        if found is None:
            return _font_not_found(request.path_params["family"])
        return JSONResponse(found.detail())

    async def font_file(self, request: Request) -> Response:
        """``GET /v1/fonts/{family}/{style}.{ttf,woff2}``: the font file."""
        family = request.path_params["family"]
        style_slug, _, ext = str(request.path_params["file"]).rpartition(".")
        if ext not in ("ttf", "woff2"):
            return _error(404, "format_unknown", "Font files are served as .ttf or .woff2.")
        style = self.fonts.style(family, style_slug)
        if style is None:
            return _font_not_found(f"{family}/{style_slug}")
        flavor: Flavor = "ttf" if ext == "ttf" else "woff2"
        data = await anyio.to_thread.run_sync(self.fonts.file, style, flavor)
        return Response(
            data,
            media_type=f"font/{ext}",
            headers={"Content-Disposition": f'inline; filename="{family}-{style.slug}.{ext}"'},
        )

    async def subset(self, request: Request) -> Response:
        """``GET /v1/fonts/{family}/subset?text=...&style=regular&format=woff2``: only the glyphs needed."""
        family = request.path_params["family"]
        text = request.query_params.get("text", "")
        requested = request.query_params.get("format", "woff2")
        if not text or len(text) > MAX_SUBSET_TEXT:
            return _error(400, "text_invalid", f"Pass ?text= with 1 to {MAX_SUBSET_TEXT} characters.")
        if requested not in ("ttf", "woff2"):
            return _error(400, "format_unknown", "format is ttf or woff2.")
        flavor: Flavor = "ttf" if requested == "ttf" else "woff2"
        style = self.fonts.style(family, request.query_params.get("style", "regular"))
        if style is None:
            return _font_not_found(family)
        data = await anyio.to_thread.run_sync(self.fonts.subset, style, text, flavor)
        return Response(data, media_type=f"font/{flavor}")

    async def css(self, request: Request) -> Response:
        """``GET /v1/css?family=lato,caladea``: ``@font-face`` rules for every style of the families."""
        names = [n.strip() for n in request.query_params.get("family", "").split(",") if n.strip()]
        if not names:
            return _error(400, "family_missing", "Pass ?family=lato (comma-separate several).")
        base = str(request.base_url).rstrip("/")
        rules: list[str] = []
        for name in names:
            found = self.fonts.family(name)
            if found is None:
                return _font_not_found(name)
            for style in sorted(found.styles.values(), key=lambda s: (s.weight, s.italic)):
                url = f"{base}/v1/fonts/{found.slug}/{style.slug}"
                rules.append(
                    "@font-face {\n"
                    f'  font-family: "{found.name}";\n'
                    f"  font-style: {'italic' if style.italic else 'normal'};\n"
                    f"  font-weight: {style.weight};\n"
                    "  font-display: swap;\n"
                    f"  src: url({url}.woff2) format('woff2'), url({url}.ttf) format('truetype');\n"
                    "}\n"
                )
        return Response("".join(rules), media_type="text/css")

    async def usage(self, request: Request) -> JSONResponse:
        """``GET /v1/usage``: requests this period (counted, delivered, pending) and the estimated bill."""
        target: BillingTarget = request.state.billing_target
        await self.metered.flush()  # counts still coalescing in this process belong in the answer
        counted = await self.counts.period_usage(target)
        totals = await self.deliveries.totals()
        tid = target.target_id
        pending = totals["pending"].get(tid, 0) + totals["claimed"].get(tid, 0)
        dead = totals["dead"].get(tid, 0)
        plan = plan_by_key(target.plan)
        body: dict[str, Any] = {
            "customer": target.customer,
            "subscription": target.subscription,
            "plan": target.plan,
            "period": {"start": target.period_start, "end": target.period_end},
            "requests": {
                "counted": counted,
                # This period's counts not waiting for the flusher nor refused have reached Stripe.
                "delivered": max(0, counted - pending - dead),
                "pending": pending,
                "failed": dead,
            },
        }
        if plan is not None:
            cents = plan.estimate_cents(counted)
            body["estimate"] = {"amount": cents, "currency": "usd", "display": _dollars(cents)}
        return JSONResponse(body)


def _font_not_found(name: str) -> JSONResponse:
    return _error(404, "font_not_found", f"No font {name!r}; GET /v1/fonts lists the families.")


def _plan_card(plan: Plan) -> str:
    return (
        '<form class="plan" method="post" action="/checkout">'
        f"<h2>{html.escape(plan.name)}</h2>"
        f"<p class=price>{_dollars(plan.base_cents)}<small>/month</small></p>"
        f"<p>{html.escape(plan.description)}</p>"
        f'<input type="hidden" name="plan" value="{plan.key}">'
        "<button>Subscribe</button></form>"
    )


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 3rem auto; padding: 0 1rem; }}
.plans {{ display: grid; grid-template-columns: repeat(3, 1fr); gap: 1rem; }}
.plan {{ border: 1px solid #ccc; border-radius: .5rem; padding: 1rem; }}
.price {{ font-size: 2rem; margin: .2rem 0; }}
pre {{ background: #f4f4f4; padding: .8rem; overflow-x: auto; }}
</style></head>
<body><h1>{html.escape(title)}</h1>{body}</body></html>
"""
