"""``metered-middleware flush`` and ``metered-middleware dead-letter``: the delivery side of the CLI.

The CLI owns the process, so it (and only it) turns SIGTERM/SIGINT into a graceful stop. Both
commands read the same ``STRIPE_*`` / ``METERED_*`` environment as the in-app flusher.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio

from metered_middleware._delivery import DeadLetter, DeliveryStore
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._errors import LayoutMismatchError, MeteringError
from metered_middleware._flusher import Checkpoint, Flusher, FlushReport
from metered_middleware._guard import LayoutGuard
from metered_middleware._layout import Layout
from metered_middleware._redis import connect

__all__ = ["add_parsers", "dead_letter_command", "flush_command", "main"]

logger = logging.getLogger("metered_middleware.flusher")


def add_parsers(subparsers: Any) -> None:
    """Register ``flush`` and ``dead-letter`` on an argparse sub-parser collection."""
    flush = subparsers.add_parser(
        "flush",
        help="deliver counted usage to Stripe (loops until SIGTERM/SIGINT)",
        description="Deliver counted usage to Stripe. Loops until SIGTERM/SIGINT, then flushes one last "
        "time within METERED_SHUTDOWN_GRACE. With --once: one pass, exit 0 if everything was delivered.",
    )
    flush.add_argument("--once", action="store_true", help="one pass; exit 1 unless all was delivered")
    flush.add_argument("--interval", type=float, help="seconds between passes (METERED_FLUSH_INTERVAL)")
    flush.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    flush.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port")
    flush.set_defaults(func=flush_command)

    dead = subparsers.add_parser("dead-letter", help="show, re-drive or discard lines Stripe refused")
    actions = dead.add_subparsers(dest="dead_letter_action", required=True)
    show = actions.add_parser("list", help="show dead-lettered lines with Stripe's error")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in (
        ("retry", "put lines back to pending: they are sent again with a new key"),
        ("discard", "remove lines for good (they will never be billed)"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("ids", nargs="*", help="ids as shown by 'dead-letter list'")
        sub.add_argument("--all", action="store_true", help="every dead-lettered line")
        sub.add_argument("--reason", help="only lines dead-lettered for this reason (with --all)")
        if name == "retry":
            sub.add_argument(
                "--to-item", help="re-drive onto this subscription item (replacing a deleted one)"
            )
    dead.set_defaults(func=dead_letter_command)


def flush_command(args: argparse.Namespace) -> int:
    """Run the flusher: ``--once`` exits 0 when everything was delivered, 1 otherwise; the loop exits 0."""
    overrides: dict[str, Any] = {}
    if args.interval is not None:
        overrides["flush_interval"] = args.interval
    try:
        settings = DeliverySettings.from_env(**overrides)
    except MeteringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checkpoint: Checkpoint | None = getattr(args, "checkpoint", None)
    if getattr(args, "metrics_port", None) is not None:
        from metered_middleware._metrics import run_with_metrics

        async def run(**flusher_kwargs: Any) -> int:
            return await _flush(settings, bool(args.once), checkpoint, **flusher_kwargs)

        return anyio.run(run_with_metrics, settings, args.metrics_port, args.metrics_host, run)
    return anyio.run(_flush, settings, bool(args.once), checkpoint)


async def _flush(
    settings: DeliverySettings, once: bool, checkpoint: Checkpoint | None, **flusher_kwargs: Any
) -> int:
    try:
        return await _flush_loop(settings, once, checkpoint, **flusher_kwargs)
    except BaseExceptionGroup as group:
        # A layout mismatch found by a pass (when Redis was down at start) ends the command like one found
        # at start: the error's message and exit 2, not a traceback.
        found = group.subgroup(LayoutMismatchError)
        if found is None:
            raise
        leaf: BaseException = found
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None


async def _flush_loop(
    settings: DeliverySettings, once: bool, checkpoint: Checkpoint | None, **flusher_kwargs: Any
) -> int:
    flusher = Flusher(settings, checkpoint=checkpoint, **flusher_kwargs)
    async with flusher, anyio.create_task_group() as tg:
        work = anyio.CancelScope()
        stopped = False

        async def on_signal() -> None:
            nonlocal stopped
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info(
                        "received %s: finishing within %ss",
                        signal.Signals(signum).name,
                        settings.shutdown_grace,
                    )
                    stopped = True
                    flusher.stop()
                    work.deadline = anyio.current_time() + settings.shutdown_grace
                    return

        tg.start_soon(on_signal)
        code = 0
        with work:
            if once:
                report = await flusher.flush_once()
                code = 0 if report.complete else 1
                if code:
                    logger.warning("flush --once did not deliver everything: %s", _incomplete(report))
                else:
                    logger.info("flush --once: %s", report)
            else:
                await flusher.run()
        tg.cancel_scope.cancel()
    return 0 if stopped else code


def _incomplete(report: FlushReport) -> str:
    """Why a pass was not complete, in words an operator can act on."""
    reasons = []
    if report.skipped_shards:
        shards = ", ".join(str(shard) for shard in sorted(report.skipped_shards))
        noun = "shard" if len(report.skipped_shards) == 1 else "shards"
        reasons.append(f"{noun} {shards} skipped (held by another flusher past the wait, or Redis was down)")
    if report.left:
        reasons.append(f"{report.left} left for a later pass (Redis or Stripe failed; they stay in Redis)")
    if report.dead:
        reasons.append(f"{report.dead} lines dead-lettered (see `metered-middleware dead-letter list`)")
    return "; ".join(reasons) + f" ({report.delivered} lines delivered)"


def dead_letter_command(args: argparse.Namespace) -> int:
    """``dead-letter list|retry|discard``."""
    try:
        settings = DeliverySettings.from_env(
            stripe_api_key=os.environ.get("STRIPE_API_KEY") or "sk_test_unused"
        )
    except MeteringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return anyio.run(_dead_letter, settings, args)


def _describe(entry: DeadLetter) -> dict[str, Any]:
    return {
        "id": entry.id,
        "target": entry.target_id,
        "units": entry.units,
        "reason": entry.reason,
        "error": dict(entry.error),
        "at": datetime.fromtimestamp(entry.at_ms / 1000, UTC).isoformat(timespec="seconds"),
    }


async def _dead_letter(settings: DeliverySettings, args: argparse.Namespace) -> int:
    redis = connect(settings.redis_url)
    try:
        layout = Layout(settings.namespace, settings.shards)
        await LayoutGuard(redis, layout).check(record=False)
        store = DeliveryStore(redis, layout)
        entries = await store.dead_letters()
        if args.dead_letter_action == "list":
            for entry in entries:
                info = _describe(entry)
                if args.json:
                    print(json.dumps(info))
                else:
                    message = info["error"].get("message", "")
                    print(f"{info['id']}\t{entry.units}\t{entry.reason}\t{info['at']}\t{message}")
            if not args.json:
                print(f"{len(entries)} dead-lettered line(s), {sum(e.units for e in entries)} unit(s)")
            return 0
        if args.all:
            ids = [e.id for e in entries if args.reason in (None, e.reason)]
        elif args.ids:
            ids = list(args.ids)
        else:
            print("error: name the ids to act on, or --all", file=sys.stderr)
            return 2
        try:
            if args.dead_letter_action == "retry":
                taken = await store.redrive(ids, subscription_item=args.to_item)
            else:
                taken = await store.discard(ids)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        verb = "re-driven" if args.dead_letter_action == "retry" else "discarded"
        for entry in taken:
            logger.warning("dead-letter %s %s: %s units of %s", entry.id, verb, entry.units, entry.target_id)
        print(f"{len(taken)} line(s) {verb}, {sum(e.units for e in taken)} unit(s)")
        return 0 if len(taken) == len(ids) else 1
    finally:
        await redis.aclose()


def _failpoint_from_env() -> Checkpoint | None:
    """``METERED_TEST_KILL_AT=<checkpoint>:<n>``: SIGKILL this process at the n-th time it passes there.

    Only this module's ``python -m`` entry reads it; the crash tests use it to die at exact, seeded points.
    """
    spec = os.environ.get("METERED_TEST_KILL_AT")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    remaining = int(count or 1)

    async def checkpoint(at: str) -> None:
        nonlocal remaining
        if at == name:
            remaining -= 1
            if remaining <= 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m metered_middleware._cli_flush``."""
    logging.basicConfig(level=os.environ.get("METERED_LOG_LEVEL", "WARNING").upper())
    parser = argparse.ArgumentParser(prog="metered-middleware")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.checkpoint = _failpoint_from_env()
    try:
        code: int = args.func(args)
    except MeteringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
