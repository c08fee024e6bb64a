"""The ``metered-middleware`` command: keys, flush, dead-letter, emulator and operations.

Every subcommand reads the same ``METERED_*`` environment as the middleware. The CLI, unlike the library,
owns its event loop and may install signal handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from metered_middleware._config import Settings
from metered_middleware._errors import MeteringError
from metered_middleware._redis import connect
from metered_middleware._registry import KeyRecord, KeyRegistry
from metered_middleware._target import BillingTarget

__all__ = ["build_parser", "main"]


def _record_json(record: KeyRecord) -> dict[str, Any]:
    target = record.target
    return {
        "key_id": record.key_id,
        "customer": target.customer,
        "subscription": target.subscription,
        "subscription_item": target.subscription_item,
        "meter_event_name": target.meter_event_name,
        "status": target.status,
        "plan": target.plan,
        "revoked": target.revoked,
        "revoked_at": record.revoked_at,
        "created": record.created,
        "label": record.label,
    }


async def _with_registry(settings: Settings, action: Any) -> int:
    client = connect(settings.redis_url)
    try:
        registry = KeyRegistry(
            client, namespace=settings.namespace, pepper=settings.key_pepper, key_prefix=settings.key_prefix
        )
        result: int = await action(registry)
        return result
    finally:
        await client.aclose()


def _keys(args: argparse.Namespace) -> int:
    settings = Settings.from_env()

    async def create(registry: KeyRegistry) -> int:
        target = BillingTarget(
            customer=args.customer,
            subscription_item=args.subscription_item,
            subscription=args.subscription,
            meter_event_name=args.meter_event,
            plan=args.plan,
        )
        issued = await registry.create(target, label=args.label)
        # The key alone on the first line, so scripts can capture it with `| head -1`.
        print(issued.key)
        if args.json:
            print(json.dumps(_record_json(issued.record)))
        else:
            print(f"key id: {issued.key_id} (shown once, stored only as a hash)", file=sys.stderr)
        return 0

    async def revoke(registry: KeyRegistry) -> int:
        record = await registry.revoke(args.key)
        if record is None:
            print("no such key", file=sys.stderr)
            return 1
        print(json.dumps(_record_json(record)) if args.json else f"revoked {record.key_id}")
        return 0

    async def list_keys(registry: KeyRegistry) -> int:
        records = await registry.list(args.customer)
        if args.json:
            print(json.dumps([_record_json(r) for r in records]))
        else:
            for r in records:
                state = "revoked" if r.target.revoked else r.target.status
                item = r.target.subscription_item or "-"
                print(f"{r.key_id}  {r.target.customer}  {item}  {state}")
        return 0

    async def rotate(registry: KeyRegistry) -> int:
        issued = await registry.rotate(args.key)
        if issued is None:
            print("no such key", file=sys.stderr)
            return 1
        print(issued.key)
        if args.json:
            print(json.dumps(_record_json(issued.record)))
        return 0

    actions = {"create": create, "revoke": revoke, "list": list_keys, "rotate": rotate}
    return asyncio.run(_with_registry(settings, actions[args.keys_command]))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="metered-middleware", description="Meter API requests in Redis and bill them through Stripe."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="create, revoke and list API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="mint a key; prints it alone on the first line")
    create.add_argument("--customer", required=True, help="Stripe customer id (cus_...)")
    create.add_argument("--subscription-item", help="subscription item id (si_...), for usage records")
    create.add_argument("--subscription", help="subscription id (sub_...), for status webhooks")
    create.add_argument("--meter-event", help="Billing Meter event name, for meter events")
    create.add_argument("--plan", help="plan name, shown in listings")
    create.add_argument("--label", help="a note for operators")
    create.add_argument("--json", action="store_true", help="print the record as JSON on the second line")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by the key or its id")
    revoke.add_argument("key", metavar="KEY_OR_ID")
    revoke.add_argument("--json", action="store_true")
    rotate = keys_sub.add_parser("rotate", help="issue a new key for the same target and revoke the old one")
    rotate.add_argument("key", metavar="KEY_OR_ID")
    rotate.add_argument("--json", action="store_true")
    listing = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--customer")
    listing.add_argument("--json", action="store_true")
    keys.set_defaults(func=_keys)

    _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    # Imported here: the emulator and flusher pull in uvicorn and the stripe SDK, which `keys` never needs.
    from metered_middleware import _cli_emulator, _cli_flush, _cli_ops

    _cli_flush.add_parsers(sub)
    _cli_ops.add_parsers(sub)
    _cli_emulator.add_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except MeteringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
