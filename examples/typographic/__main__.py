"""``python -m examples.typographic [serve|setup-stripe]``: the font API in one command.

With no ``REDIS_URL`` an embedded redis-server starts; with no ``STRIPE_API_KEY`` the local Stripe emulator
starts, the plans are created in it and one demo customer per plan signs up through Checkout, so the keys
and curl commands printed are ready to paste. With ``STRIPE_API_KEY=sk_test_...`` and
``STRIPE_WEBHOOK_SECRET`` the app runs against Stripe test mode instead. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import anyio
import httpx
import stripe
import uvicorn

from examples.typographic.app import Typographic, example_settings
from examples.typographic.billing import StripeSetup, create_checkout_session, setup_stripe
from examples.typographic.plans import METER_EVENT_NAME, PLANS
from metered_middleware import ConfigurationError, connect
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._redis_server import RedisServer

__all__ = ["main"]


@dataclass
class Backends:
    """Where Redis and Stripe are, and how to stop what was started for them."""

    redis_url: str
    redis_label: str
    stripe_client: stripe.StripeClient
    stripe_label: str
    api_base: str | None
    stripe_api_key: str
    webhook_secret: str
    emulator: Any = None  # a StripeEmulator when running on the local emulator


@contextlib.asynccontextmanager
async def backends(env: Mapping[str, str], port: int) -> AsyncIterator[Backends]:
    """Start the embedded Redis and the Stripe emulator when the environment names none; stop them after."""
    async with contextlib.AsyncExitStack() as stack:
        redis_url = env.get("METERED_REDIS_URL") or env.get("REDIS_URL")
        label = redis_url or ""
        if not redis_url:
            server = RedisServer().start()
            stack.callback(server.close)
            redis_url = server.url
            label = f"embedded redis-server at {redis_url}"
        api_key = env.get("STRIPE_API_KEY", "").strip()
        if api_key:
            secret = env.get("STRIPE_WEBHOOK_SECRET", "").strip()
            if not secret.startswith("whsec_"):
                raise ConfigurationError(
                    "STRIPE_WEBHOOK_SECRET", secret, "the whsec_... secret of your webhook endpoint"
                )
            http = stripe.HTTPXClient()
            stack.push_async_callback(http.close_async)
            api_base = env.get("METERED_STRIPE_API_BASE") or None
            client = stripe.StripeClient(
                api_key, http_client=http, base_addresses={"api": api_base} if api_base else {}
            )
            yield Backends(redis_url, label, client, "Stripe test mode", api_base, api_key, secret)
            return
        from metered_middleware.testing.emulator import StripeEmulator

        secret = "whsec_" + secrets.token_hex(16)
        emulator = StripeEmulator(
            rate_limit=None, webhook_url=f"http://127.0.0.1:{port}/stripe/webhook", webhook_secret=secret
        ).start()
        stack.callback(emulator.stop)
        yield Backends(
            redis_url,
            label,
            emulator.client(),
            f"local Stripe emulator at {emulator.url}",
            emulator.url,
            "sk_test_emulator",
            secret,
            emulator,
        )


def delivery_settings(env: Mapping[str, str], found: Backends) -> DeliverySettings:
    """The in-app flusher's settings: the environment's, pointed at the same Redis and Stripe."""
    overrides: dict[str, Any] = {"stripe_api_key": found.stripe_api_key, "redis_url": found.redis_url}
    if found.api_base:
        overrides["api_base"] = found.api_base
    if not env.get("METERED_METER_EVENT_NAME"):
        overrides["meter_event_name"] = METER_EVENT_NAME
    if found.emulator is not None:
        overrides.setdefault("rate_limit", 0.0)  # the emulator runs without Stripe's rate limit
        if not env.get("METERED_FLUSH_INTERVAL"):
            overrides["flush_interval"] = 2.0  # the demo shows "delivered" catching up quickly
    return DeliverySettings.from_env(env, **overrides)


async def sign_up_demo(
    found: Backends, setup: StripeSetup, base: str, *, legacy: bool
) -> list[tuple[str, str, str]]:
    """One customer per plan through Checkout on the emulator; returns (plan, customer, key) for each."""
    emulator = found.emulator
    out: list[tuple[str, str, str]] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for plan in PLANS:
            session = await create_checkout_session(
                found.stripe_client,
                plan,
                setup.price_for(plan, legacy=legacy),
                success_url=f"{base}/success?session_id={{CHECKOUT_SESSION_ID}}",
                cancel_url=f"{base}/",
                legacy=legacy,
            )
            # Pays as a customer would, then blocks until the webhooks reached the app: run it off the loop.
            ids = await anyio.to_thread.run_sync(functools.partial(emulator.complete_checkout, session.id))
            page = await http.get(
                "/success", params={"session_id": session.id}, headers={"Accept": "application/json"}
            )
            page.raise_for_status()
            out.append((plan.name, ids["customer"], page.json()["api_key"]))
    return out


def print_demo(out: TextIO, base: str, found: Backends, keys: Sequence[tuple[str, str, str]]) -> None:
    """The keys and curl commands a new user pastes."""
    print(f"\nTypographic is running on {base}", file=out)
    print(f"  Redis:  {found.redis_label}", file=out)
    print(f"  Stripe: {found.stripe_label}", file=out)
    if not keys:
        print(f"\nSubscribe at {base}/", file=out)
        if found.emulator is None:
            print(
                f"Forward Stripe's webhooks with: stripe listen --forward-to {base}/stripe/webhook", file=out
            )
    else:
        print("\nDemo customers (each key is shown once; only its hash is stored):", file=out)
        for plan, customer, key in keys:
            print(f"  {plan:<11} {customer:<24} {key}", file=out)
        key = keys[0][2]
        auth = f'-H "Authorization: Bearer {key}"'
        print("\nTry, as the Standard customer:", file=out)
        print(f"  curl {auth} {base}/v1/fonts", file=out)
        print(f"  curl {auth} {base}/v1/fonts/lato", file=out)
        print(f"  curl {auth} -o lato.woff2 {base}/v1/fonts/lato/regular.woff2", file=out)
        print(f'  curl {auth} "{base}/v1/css?family=lato"', file=out)
        print(f'  curl {auth} -o hello.woff2 "{base}/v1/fonts/lato/subset?text=Hello"   # counts 5', file=out)
        print(f"  curl {auth} {base}/v1/usage", file=out)
    print("\nPress Ctrl-C to stop.", file=out, flush=True)


async def serve(env: Mapping[str, str], host: str, port: int, out: TextIO) -> None:
    """Run the app under uvicorn until interrupted."""
    async with backends(env, port) as found:
        delivery = delivery_settings(env, found)
        legacy = delivery.sink == "usage_records"
        setup = await setup_stripe(found.stripe_client, legacy=legacy)
        settings = example_settings(env, redis_url=found.redis_url)
        redis = connect(found.redis_url)
        try:
            app = Typographic(
                redis=redis,
                settings=settings,
                stripe_client=found.stripe_client,
                webhook_secret=found.webhook_secret,
                prices=setup.legacy_prices if legacy else setup.prices,
                delivery=delivery,
            )
            config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level="warning")
            server = uvicorn.Server(config)
            base = f"http://{host}:{port}"
            async with anyio.create_task_group() as tg:

                async def announce() -> None:
                    while not server.started:
                        if server.should_exit:
                            return
                        await anyio.sleep(0.02)
                    try:
                        keys = await sign_up_demo(found, setup, base, legacy=legacy) if found.emulator else []
                    except Exception as exc:  # Stripe, HTTP or emulator errors alike: the demo is optional
                        # The app stays useful without demo customers: say why, and how to sign up by hand.
                        print(f"demo sign-up failed: {exc}", file=sys.stderr)
                        keys = []
                    print_demo(out, base, found, keys)

                tg.start_soon(announce)
                await server.serve()
                tg.cancel_scope.cancel()
        finally:
            await redis.aclose()


async def setup_only(env: Mapping[str, str], out: TextIO) -> None:
    """``setup-stripe``: create (or find) the meter, products and prices, and say which."""
    api_key = env.get("STRIPE_API_KEY", "").strip()
    if not api_key:
        raise ConfigurationError(
            "STRIPE_API_KEY", "", "a Stripe test key sk_test_... (the demo sets up the emulator itself)"
        )
    api_base = env.get("METERED_STRIPE_API_BASE") or None
    http = stripe.HTTPXClient()
    close: Callable[[], Awaitable[None]] = http.close_async
    try:
        client = stripe.StripeClient(
            api_key, http_client=http, base_addresses={"api": api_base} if api_base else {}
        )
        legacy = env.get("METERED_SINK", "meter_events").strip() == "usage_records"
        setup = await setup_stripe(client, legacy=legacy)
    finally:
        await close()
    print(f"meter {METER_EVENT_NAME}: {setup.meter}", file=out)
    for plan in PLANS:
        line = f"{plan.name:<11} {plan.lookup_key}: {setup.prices[plan.key]}"
        if legacy:
            line += f"   {plan.legacy_lookup_key}: {setup.legacy_prices[plan.key]}"
        print(line, file=out)
    print(
        f"created {len(setup.created)} object(s)"
        + (": " + ", ".join(setup.created) if setup.created else ""),
        file=out,
    )


def _exit_on(signum: int) -> Callable[[int, Any], None]:
    def handler(_signum: int, _frame: Any) -> None:
        # uvicorn re-raises the signal it caught once it has shut down; exiting through SystemExit runs the
        # finally blocks that stop the emulator and the embedded Redis.
        raise SystemExit(0)

    return handler


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The command line; returns the exit status."""
    environ = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m examples.typographic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "setup-stripe"))
    parser.add_argument("--host", default=environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(environ.get("PORT", "8000")))
    args = parser.parse_args(argv)
    try:
        if args.command == "setup-stripe":
            anyio.run(setup_only, environ, sys.stdout)
            return 0
        signal.signal(signal.SIGTERM, _exit_on(signal.SIGTERM))
        try:
            anyio.run(serve, environ, args.host, args.port, sys.stdout)
        except* (KeyboardInterrupt, SystemExit):
            # Ctrl-C or SIGTERM, the servers already stopped. The task group hands SIGTERM's SystemExit on
            # inside an exception group, which would otherwise print as a traceback and exit 1.
            pass
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
