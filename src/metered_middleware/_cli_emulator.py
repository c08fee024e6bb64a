"""`metered-middleware emulator`: run the local Stripe emulator until interrupted."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys

from metered_middleware.testing.emulator import DEFAULT_RATE_LIMIT, StripeEmulator

#: stripe-mock's well-known port, so existing local setups keep their base address.
DEFAULT_PORT = 12111


def _rate_limit(value: str) -> float | None:
    if value.lower() == "off":
        return None
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of requests/s or 'off', got {value!r}")
    return rate


def _secret(value: str) -> str:
    if not value.startswith("whsec_"):
        raise argparse.ArgumentTypeError(f"webhook secrets start with 'whsec_', got {value!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `emulator` subcommand."""
    parser = subparsers.add_parser(
        "emulator",
        help="run a local, stateful Stripe test-mode API for the official SDK",
        description=(
            "Serve a stateful Stripe emulator. Point the SDK at the printed URL with "
            "StripeClient('sk_test_...', base_addresses={'api': URL, 'meter_events': URL})."
        ),
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--webhook-url", default=None, help="where to POST signed webhook events")
    parser.add_argument(
        "--webhook-secret",
        type=_secret,
        default=None,
        help="whsec_... secret that signs webhooks (generated and printed when omitted)",
    )
    parser.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=DEFAULT_RATE_LIMIT,
        metavar="N|off",
        help=f"requests per second before 429 rate_limit (default {DEFAULT_RATE_LIMIT:g}, test mode's limit)",
    )
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; the base URL goes to stdout, alone on its line, for scripts to read."""
    secret = args.webhook_secret
    if args.webhook_url and secret is None:
        secret = "whsec_" + secrets.token_hex(16)
        print(f"webhook signing secret: {secret}", file=sys.stderr)
    emulator = StripeEmulator(
        rate_limit=args.rate_limit,
        webhook_url=args.webhook_url,
        webhook_secret=secret,
        host=args.host,
        port=args.port,
    )

    def ready(url: str) -> None:
        print(url, flush=True)
        print(
            f"Stripe emulator listening on {url} (Ctrl-C to stop). Point the SDK at it with\n"
            f"  stripe.StripeClient('sk_test_...', base_addresses={{'api': '{url}', "
            f"'meter_events': '{url}'}}, http_client=EmulatorHTTPXClient())",
            file=sys.stderr,
            flush=True,
        )

    # uvicorn re-raises the interrupt after its graceful shutdown; that is the normal way out.
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever(on_ready=ready)
    return 0
