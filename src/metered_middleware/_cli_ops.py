"""``metered-middleware status``, ``usage`` and ``reconcile``: what the meter holds, and does Stripe agree.

All three read the same ``METERED_*`` environment as the middleware (and ``STRIPE_*`` for reconcile); none of
them writes to Redis or Stripe.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import redis.asyncio as aioredis

from metered_middleware._config import Settings
from metered_middleware._errors import MeteringError
from metered_middleware._guard import LayoutGuard
from metered_middleware._inspect import ShardStatus, TargetUsage, read_shards, target_usage
from metered_middleware._layout import Layout
from metered_middleware._redis import connect
from metered_middleware._registry import KeyRegistry

__all__ = ["add_parsers", "reconcile_command", "status_command", "usage_command"]

_T = TypeVar("_T")


def add_parsers(subparsers: Any) -> None:
    """Register ``status``, ``usage`` and ``reconcile`` on an argparse sub-parser collection."""
    status = subparsers.add_parser(
        "status", help="per shard: pending units and age, batches in flight, lease holder, dead-letter"
    )
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status.set_defaults(func=status_command)

    usage = subparsers.add_parser("usage", help="counted, delivered and pending units this period")
    who = usage.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", help="Stripe customer id (cus_...)")
    who.add_argument("--key-id", help="key id (key_...) as shown by 'keys list'")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=usage_command)

    rec = subparsers.add_parser(
        "reconcile",
        help="compare delivered usage with Stripe's totals; exit 1 on drift",
        description="Compare what was delivered per billing target with Stripe's own totals (usage record "
        "summaries or meter event summaries). Exit 0 when they agree, 1 on drift, 2 on errors.",
    )
    rec.add_argument("--period", choices=("current", "previous"), default="current")
    rec.add_argument("--customer", help="only this customer's targets")
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(func=reconcile_command)


async def _with_redis(settings: Settings, action: Callable[[aioredis.Redis], Awaitable[_T]]) -> _T:
    client = connect(settings.redis_url)
    try:
        # Read under another shard count, every figure would be someone else's (or nobody's): refused.
        await LayoutGuard(client, Layout(settings.namespace, settings.shards)).check(record=False)
        return await action(client)
    finally:
        await client.aclose()


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _print_status(shards: list[ShardStatus]) -> None:
    header = ("shard", "pending", "age", "batches", "claimed", "oldest", "dead", "delivered", "lease holder")
    rows = [
        (
            str(s.shard),
            f"{s.pending_units} ({s.pending_targets})",
            _ago(s.pending_age),
            str(s.batches),
            str(s.claimed_units),
            _ago(s.oldest_batch_age),
            f"{s.dead_letters} ({s.dead_units}u)",
            str(s.delivered_units),
            s.lease_holder or "-",
        )
        for s in shards
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def status_command(args: argparse.Namespace) -> int:
    """Print every shard's state; exit 0."""
    settings = Settings.from_env()
    layout = Layout(settings.namespace, settings.shards)

    async def read(redis: aioredis.Redis) -> tuple[list[ShardStatus], bool]:
        # _with_redis has refused another recorded layout; what is left to tell is whether one is recorded.
        return await read_shards(redis, layout), bool(await redis.exists(layout.record()))

    shards, recorded = anyio.run(_with_redis, settings, read)
    described = {"shards": layout.shards, "buckets": layout.buckets, "recorded": recorded}
    if args.json:
        rows = [s.as_dict() for s in shards]
        print(json.dumps({"namespace": settings.namespace, "layout": described, "shards": rows}))
    else:
        _print_status(shards)
        print(
            f"layout: {layout.shards} shards x {layout.buckets} buckets, "
            + ("recorded in Redis" if recorded else "not recorded yet (nothing has counted or flushed)")
        )
    return 0


async def _usage(redis: aioredis.Redis, settings: Settings, args: argparse.Namespace) -> list[TargetUsage]:
    layout = Layout(settings.namespace, settings.shards)
    if args.key_id:
        registry = KeyRegistry(
            redis, namespace=settings.namespace, pepper=settings.key_pepper, key_prefix=settings.key_prefix
        )
        record = await registry.get(args.key_id)
        if record is None:
            return []
        target_ids = [record.target.target_id]
    else:
        target_ids = []
        for shard in range(layout.shards):
            for name in await redis.hkeys(layout.targets(shard)):
                target_id = name.decode() if isinstance(name, bytes) else str(name)
                if target_id.split("|", 1)[0] == args.customer:
                    target_ids.append(target_id)
    return [await target_usage(redis, layout, t) for t in sorted(target_ids)]


def _day(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d") if ts else "-"


def usage_command(args: argparse.Namespace) -> int:
    """Print a customer's or a key's usage this period; exit 1 when nothing was counted for it."""
    settings = Settings.from_env()
    rows = anyio.run(_with_redis, settings, lambda r: _usage(r, settings, args))
    if args.json:
        print(json.dumps([u.as_dict() for u in rows]))
    else:
        for u in rows:
            print(
                f"{u.target_id}  period {_day(u.period_start)}..{_day(u.period_end)}  counted {u.counted}  "
                f"delivered {u.delivered}  pending {u.pending + u.claimed}  dead-lettered {u.dead}"
            )
    if not rows:
        print("nothing counted for it", file=sys.stderr)
        return 1
    return 0


def reconcile_command(args: argparse.Namespace) -> int:
    """Reconcile with Stripe: exit 0 when every target agrees, 1 on drift, 2 when it could not check."""
    # Imported here: the stripe SDK is only needed by this command.
    from metered_middleware._delivery_config import DeliverySettings
    from metered_middleware._reconcile import ReconcileReport, reconcile
    from metered_middleware._sinks import make_stripe_client

    try:
        settings = Settings.from_env()
        delivery = DeliverySettings.from_env()
    except MeteringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layout = Layout(settings.namespace, settings.shards)

    async def run(redis: aioredis.Redis) -> ReconcileReport:
        client, http = make_stripe_client(delivery)
        try:
            return await reconcile(
                redis, layout, client, delivery, period=args.period, customer=args.customer
            )
        finally:
            close: Callable[[], Awaitable[Any]] = http.close_async  # the SDK leaves it untyped
            await close()

    try:
        report = anyio.run(_with_redis, settings, run)
    except MeteringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for line in report.lines:
            print(
                f"{line.status:9}  {line.target_id}  {_day(line.period_start)}..{_day(line.period_end)}  "
                f"delivered {line.delivered}  stripe {line.stripe}  in flight {line.in_flight}  "
                f"drift {line.drift:+d}"
            )
            for hint in line.look_at:
                print(f"           look at: {hint}")
        drifted = report.drifted
        summary = f"{len(report.lines)} target(s) reconciled ({report.sink}), {len(drifted)} with drift"
        print(summary, file=sys.stderr if drifted else sys.stdout)
    return 1 if report.drifted else 0
