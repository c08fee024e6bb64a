"""The delivery loop: claims pending counts and bills each line through a sink, exactly once.

One lease per shard (fenced), leftover batches first and oldest first, bounded concurrency, a
token-bucket rate limit, one call in flight per customer and meter, jittered backoff, a staleness
horizon, explicit re-stamps, and a graceful shutdown whose final flush is bounded by a grace period.
``run()`` never installs signal handlers.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import redis.asyncio as aioredis
import stripe
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from metered_middleware._delivery import Batch, BatchLine, DeliveryStore, LeaseLostError, Stamp, line_key
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._errors import LayoutMismatchError, StorageError
from metered_middleware._guard import LayoutGuard
from metered_middleware._layout import Layout
from metered_middleware._limits import KeyedLocks, TokenBucket, backoff_delay
from metered_middleware._redis import connect
from metered_middleware._sinks import Outcome, SendLine, Sink, make_sink, make_stripe_client
from metered_middleware._target import parse_target_id

__all__ = ["FlushReport", "Flusher"]

logger = logging.getLogger("metered_middleware.flusher")

Checkpoint = Callable[[str], Awaitable[None]]
# A line whose timestamp Stripe keeps refusing is re-stamped at most this often before it is dead-lettered.
_MAX_RESTAMPS = 3
# Delivered lines wait up to this long (while other sends are in flight) to share one ack script call:
# at ~1,000 lines/s with 16 requests in flight, acks went from ~2 lines a call to ~10-15, and Redis round
# trips from ~6% of the flusher's CPU per line to ~1%. A crash in the wait only means an identical resend.
_ACK_LINGER = 0.01
_ACK_BATCH = 64


def _audit(
    event: str,
    shard: int,
    seq: int,
    line: BatchLine | None = None,
    stamp: Stamp | None = None,
    answer: Outcome | None = None,
    **more: Any,
) -> dict[str, Any]:
    """Structured fields of a delivery decision, for ``extra=`` (JSON logs; no API key ever goes in).

    ``target`` is the target id (customer|item|event); ``idempotency_key`` is the line's key, which is also
    its meter event identifier; ``timestamp`` and ``attempt`` are those of the stamp sent.
    """
    fields: dict[str, Any] = {"event": event, "shard": shard, "seq": seq}
    if line is not None:
        fields["target"] = line.target_id
        fields["units"] = line.units
    if stamp is not None:
        fields["attempt"] = stamp.attempt
        fields["idempotency_key"] = stamp.key
        fields["timestamp"] = stamp.timestamp
    if answer is not None:
        fields["outcome"] = answer.kind
        if answer.reason:
            fields["reason"] = answer.reason
        fields.update(_stripe_error_fields(answer.error))
    fields.update(more)
    return fields


def _stripe_error_fields(error: Mapping[str, Any]) -> dict[str, Any]:
    """Stripe's answer, flattened: HTTP status, error code and type, message, request id."""
    names = {
        "status": "stripe_status",
        "code": "stripe_code",
        "stripe_type": "stripe_error_type",
        "type": "error_class",
        "message": "stripe_message",
        "request_id": "stripe_request_id",
    }
    return {out: error[key] for key, out in names.items() if error.get(key) is not None}


@dataclass
class FlushReport:
    """What one pass did, in lines."""

    delivered: int = 0
    dead: int = 0
    restamped: int = 0
    left: int = 0
    skipped_shards: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Everything this pass saw was delivered: nothing dead-lettered, left over, or on a skipped shard."""
        return not (self.dead or self.left or self.skipped_shards)


class _AckWriter:
    """Acknowledges one batch's delivered lines in few Redis round trips, in a task of the batch's group.

    While other sends are in flight and fewer than ``_ACK_BATCH`` lines wait, the writer first waits
    ``_ACK_LINGER`` for more, then acknowledges all of them in one script call; lines delivered while it
    writes go in its next call. When nothing else is in flight, a line is acknowledged at once. Every
    ack stays fenced by the lease token and names the stamp that was sent. A line sent but not yet
    acknowledged when the flusher dies is resent identically by the next one, as before: Stripe replays
    it. Errors (a lost lease, Redis down) propagate through the batch's task group as before.
    """

    def __init__(
        self, flusher: Flusher, shard: int, seq: int, token: str, report: FlushReport, tg: TaskGroup
    ) -> None:
        self._flusher = flusher
        self._shard, self._seq, self._token = shard, seq, token
        self._report = report
        self._tg = tg
        self._pending: list[tuple[str, str]] = []
        self._writing = False

    def add(self, lines: list[tuple[str, str]]) -> None:
        """Acknowledge ``(target, stamp sent)`` pairs soon: starts the writer unless it is running."""
        self._pending += lines
        if self._pending and not self._writing:
            self._writing = True
            self._tg.start_soon(self._write)

    async def _write(self) -> None:
        try:
            flusher = self._flusher
            while self._pending:
                if len(self._pending) < _ACK_BATCH and flusher._sending:
                    await anyio.sleep(_ACK_LINGER)
                todo, self._pending = self._pending, []
                acked = await flusher.store.ack(self._shard, self._seq, self._token, todo)
                self._report.delivered += acked  # not `+= await`: that reads the total before yielding
                await flusher._checkpoint_at("acked")
        finally:
            self._writing = False


class Flusher:
    """Delivers what the middleware counted. Use ``async with Flusher(settings) as f`` then ``await f.run()``
    (loops until ``stop()``) or ``await f.flush_once()`` (one pass).

    ``redis``, ``client`` and ``sink`` may be given (tests, a shared pool); what it creates it closes.
    ``checkpoint`` is awaited at named points of a line's life (``claimed``, ``before_send``, ``sent``,
    ``send_failed``, ``acked``) — the crash tests kill the process there.
    """

    def __init__(
        self,
        settings: DeliverySettings,
        *,
        redis: aioredis.Redis | None = None,
        client: stripe.StripeClient | None = None,
        sink: Sink | None = None,
        owner: str | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.settings = settings
        self.layout = Layout(settings.namespace, settings.shards)
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._redis = redis
        self._client = client
        self._sink = sink
        self._owned: list[Callable[[], Awaitable[Any]]] = []
        self._checkpoint = checkpoint
        rate = settings.effective_rate_limit
        self._bucket = TokenBucket(rate) if rate else None
        self._slots = anyio.Semaphore(settings.max_concurrency)
        self._locks = KeyedLocks()
        self._tokens: dict[int, str] = {}
        self._stop = anyio.Event()
        self._clock_cache: dict[str, int] = {}
        self._sending = 0  # sink calls in flight, over every shard

    # -- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Flusher:
        if self._redis is None and self.settings.redis_url.startswith("redis+cluster://"):
            # The cluster client follows MOVED and failovers itself; every delivery script is single-slot.
            self._redis = connect(self.settings.redis_url)
            self._owned.append(self._redis.aclose)
        if self._redis is None:
            # Reconnect through a Redis restart; every delivery script is safe to run twice.
            self._redis = aioredis.Redis.from_url(
                self.settings.redis_url,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 5),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
            )
            self._owned.append(self._redis.aclose)
        if self._client is None:
            self._client, http = make_stripe_client(self.settings)
            self._owned.append(http.close_async)
        if self._sink is None:
            self._sink = make_sink(self.settings, self._client)
        self.store = DeliveryStore(self._redis, self.layout)
        self._guard = LayoutGuard(self._redis, self.layout)
        try:
            await self._guard.check()
        except LayoutMismatchError:
            await self.aclose()
            raise
        except StorageError as exc:
            logger.warning("could not check the namespace's layout (%s); checking before the first pass", exc)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release held leases and close what this flusher opened (idempotent)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for shard, token in list(self._tokens.items()):
                await self._release(shard, token)
            self._tokens.clear()
            while self._owned:
                await self._owned.pop()()

    @property
    def sink(self) -> Sink:
        """The sink lines are sent through."""
        assert self._sink is not None, "use the flusher inside 'async with'"
        return self._sink

    def stop(self) -> None:
        """Ask ``run()`` to finish: one final flush bounded by ``shutdown_grace``, then return."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush every ``flush_interval`` until ``stop()``, then a final flush bounded by the grace period.

        Batches left unfinished stay in Redis for the next flusher; nothing is lost by stopping.
        """
        grace = anyio.CancelScope()

        async def arm_grace() -> None:
            await self._stop.wait()
            grace.deadline = anyio.current_time() + self.settings.shutdown_grace

        async with anyio.create_task_group() as tg:
            tg.start_soon(arm_grace)
            task_status.started()
            with grace:
                while not self._stop.is_set():
                    await self._guarded_pass()
                    with anyio.move_on_after(self.settings.flush_interval):
                        await self._stop.wait()
                await self._guarded_pass()
            tg.cancel_scope.cancel()
        if grace.cancelled_caught:
            logger.warning(
                "shutdown grace period ended; unfinished batches stay in Redis for the next flusher"
            )

    async def _guarded_pass(self) -> None:
        # The loop keeps its shards between passes, so `status` and the lease gauge name their owner.
        report = await self.flush_once(lease_wait=0.0, keep_leases=True)
        if report.delivered or report.dead or report.left:
            logger.info("flush pass: %s", report)

    async def flush_once(self, *, lease_wait: float | None = None, keep_leases: bool = False) -> FlushReport:
        """One pass over every shard: leftover batches oldest first, then newly claimed counts.

        ``lease_wait`` is how long to wait for a shard another flusher holds (default: one lease TTL, so a
        crashed flusher's lease expires first); a shard still held is reported in ``skipped_shards``.

        Each shard's lease is released as soon as its work in this pass is done (``keep_leases`` keeps it,
        as ``run()`` does), so that several one-pass flushers started together take turns on a shard instead
        of each holding the shards it finished while waiting for the others' until its wait runs out.
        """
        report = FlushReport()
        try:
            # A flusher of another shard count would claim none of the recorded shards' pending units.
            await self._guard.check()
        except StorageError as exc:
            logger.warning("shards skipped: %s; retrying next pass", exc)
            report.skipped_shards.extend(range(self.layout.shards))
            return report
        self._clock_cache.clear()
        wait = self.settings.lease_ttl + 1 if lease_wait is None else lease_wait
        async with anyio.create_task_group() as tg:
            for shard in range(self.layout.shards):
                tg.start_soon(self._flush_shard, shard, report, wait, keep_leases)
        return report

    # -- one shard ---------------------------------------------------------------------------------
    async def _acquire(self, shard: int, wait: float) -> str | None:
        ttl_ms = int(self.settings.lease_ttl * 1000)
        deadline = anyio.current_time() + wait
        while True:
            token = await self.store.acquire_lease(shard, self.owner, ttl_ms, self._tokens.get(shard))
            if token:
                self._tokens[shard] = token
                return token
            self._tokens.pop(shard, None)
            if anyio.current_time() >= deadline:
                return None
            await anyio.sleep(min(0.1, self.settings.lease_ttl / 4))

    async def _flush_shard(self, shard: int, report: FlushReport, wait: float, keep_lease: bool) -> None:
        try:
            token = await self._acquire(shard, wait)
            if token is None:
                report.skipped_shards.append(shard)
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, shard, token, tg.cancel_scope)
                for seq in await self.store.batch_seqs(shard):
                    await self._deliver(shard, seq, token, report)
                while claimed := await self.store.claim(shard, token, self.settings.batch_size):
                    await self._checkpoint_at("claimed")
                    await self._deliver(shard, claimed[0], token, report)
                tg.cancel_scope.cancel()
            if not keep_lease and self._tokens.pop(shard, None) is not None:
                # Nothing of this shard is in flight now: whoever takes it next finds no batch of ours.
                await self._release(shard, token)
        except* LeaseLostError as group:
            logger.warning(
                "shard %s: %s; the new holder finishes its batches",
                shard,
                group.exceptions[0],
                extra={"event": "lease_lost", "shard": shard, "outcome": "left", "reason": "lease_lost"},
            )
            self._tokens.pop(shard, None)
            report.left += 1
        except* StorageError as group:
            # Redis is down or restarting: what was sent and not acknowledged is resent, identically, later.
            logger.warning(
                "shard %s: %s; retrying next pass",
                shard,
                group.exceptions[0],
                extra={"event": "storage_error", "shard": shard, "outcome": "left", "reason": "redis"},
            )
            report.left += 1

    async def _release(self, shard: int, token: str) -> None:
        """Free a shard whose work is done; if Redis cannot be reached the lease just expires (its TTL), and
        what was delivered stays delivered."""
        try:
            await self.store.release_lease(shard, token)
        except StorageError:
            logger.warning("could not release the lease of shard %s; it will expire", shard)

    async def _keep_lease(self, shard: int, token: str, work: anyio.CancelScope) -> None:
        ttl_ms = int(self.settings.lease_ttl * 1000)
        while True:
            await anyio.sleep(self.settings.lease_ttl / 3)
            try:
                renewed = await self.store.acquire_lease(shard, self.owner, ttl_ms, token)
            except StorageError as exc:
                logger.warning("shard %s: lease renewal failed: %s", shard, exc)
                continue
            if renewed != token:
                # Another flusher holds the shard now: stop sending; our acks would be refused anyway.
                logger.warning(
                    "shard %s: lease lost, stopping work on it",
                    shard,
                    extra={
                        "event": "lease_lost",
                        "shard": shard,
                        "outcome": "stopped",
                        "reason": "lease_lost",
                    },
                )
                self._tokens.pop(shard, None)
                if renewed:
                    await self.store.release_lease(shard, renewed)
                work.cancel()
                return

    async def _checkpoint_at(self, name: str) -> None:
        if self._checkpoint is not None:
            await self._checkpoint(name)

    # -- one batch ---------------------------------------------------------------------------------
    async def _now(self, line: BatchLine, batch: Batch) -> int:
        """The time a line is stamped with: the test clock's frozen time, else Redis time at claim."""
        clock = line.meta.get("test_clock")
        if not clock:
            return batch.claimed_at_ms // 1000
        if clock not in self._clock_cache:
            assert self._client is not None
            found = await self._client.v1.test_helpers.test_clocks.retrieve_async(clock)
            self._clock_cache[clock] = int(found.frozen_time)
        return self._clock_cache[clock]

    def _place(self, line: BatchLine, now: int) -> tuple[int, bool]:
        """The timestamp inside the period the line was counted in; past that period's end, ``now``
        (an explicit re-stamp: the period closed before the line could be sent)."""
        start, end = line.meta.get("period_start"), line.meta.get("period_end")
        if isinstance(start, int) and isinstance(end, int) and end > start:
            if now >= end:
                return now, True
            return max(now, start), False
        return now, False

    async def _deliver(self, shard: int, seq: int, token: str, report: FlushReport) -> None:
        batch = await self.store.load(shard, seq)
        if batch is None:
            return
        horizon_ms = int(self.settings.stale_after * 1000)
        stale = [
            line
            for line in batch.lines
            if line.stamp and batch.read_at_ms - line.stamp.first_attempt_ms > horizon_ms
        ]
        if stale:
            # DESIGN invariant 8: past the deduplication horizon a resend could bill twice; reconcile instead.
            error = {"message": f"first attempted more than {self.settings.stale_after:.0f}s ago"}
            moved = await self.store.dead_letter(
                shard,
                seq,
                token,
                [(line.target_id, line.stamp.raw if line.stamp else "", "stale", error) for line in stale],
            )
            report.dead += moved
            logger.error(
                "shard %s batch %s: %d stale line(s) dead-lettered for reconciliation",
                shard,
                seq,
                moved,
                extra=_audit("stale_dead_lettered", shard, seq, outcome="dead", reason="stale", lines=moved),
            )
            for line in stale:
                logger.error(
                    "dead-lettered %s (shard %s batch %s): stale, first attempted %d ms before this read",
                    line.target_id,
                    shard,
                    seq,
                    batch.read_at_ms - (line.stamp.first_attempt_ms if line.stamp else 0),
                    extra=_audit(
                        "dead_lettered", shard, seq, line, line.stamp, outcome="dead", reason="stale"
                    ),
                )
        stale_ids = {line.target_id for line in stale}
        lines = [line for line in batch.lines if line.target_id not in stale_ids]
        stamped: list[tuple[BatchLine, Stamp]] = [(line, line.stamp) for line in lines if line.stamp]
        fresh = [line for line in lines if line.stamp is None]
        if fresh:
            requests: list[tuple[str, str]] = []
            for line in fresh:
                try:
                    now = await self._now(line, batch)
                except stripe.StripeError as exc:
                    logger.warning(
                        "test clock lookup failed, retrying later: %s",
                        exc,
                        extra=_audit(
                            "clock_lookup_failed",
                            shard,
                            seq,
                            line,
                            outcome="left",
                            test_clock=line.meta.get("test_clock"),
                            stripe_code=getattr(exc, "code", None),
                            stripe_status=getattr(exc, "http_status", None),
                        ),
                    )
                    report.left += 1
                    continue
                ts, moved_on = self._place(line, now)
                if moved_on:
                    report.restamped += 1
                    logger.warning(
                        "shard %s batch %s: %s counted in a period that closed before sending; stamped at %s",
                        shard,
                        seq,
                        line.target_id,
                        ts,
                        extra=_audit(
                            "stamped_after_period",
                            shard,
                            seq,
                            line,
                            timestamp=ts,
                            reason="period_closed",
                            period_end=line.meta.get("period_end"),
                        ),
                    )
                key = line_key(self.layout.namespace, shard, seq, batch.claimed_at_ms, 1, line.target_id)
                requests.append((line.target_id, f"1|{ts}|{key}"))
            by_id = {line.target_id: line for line in fresh}
            stamps = await self.store.stamp(shard, seq, token, requests)
            stamped += [(by_id[tid], s) for (tid, _), s in zip(requests, stamps, strict=True) if s]
        limit = self.sink.batch_limit
        groups = [stamped[i : i + limit] for i in range(0, len(stamped), limit)]
        pending = iter(groups)
        async with anyio.create_task_group() as tg:
            acks = _AckWriter(self, shard, seq, token, report, tg)

            async def sender() -> None:
                # A few long-lived senders take the batch's groups in order, instead of one task per
                # group (1,000 task spawns a batch for the v1 sinks, ~7% of the flusher's CPU). A group
                # that must wait to retry is handed to a task of its own, so backoff never holds a sender.
                for group in pending:
                    await self._send(shard, seq, token, group, report, batch, acks, retries=tg)

            for _ in range(min(len(groups), self.settings.max_concurrency)):
                tg.start_soon(sender)

    # -- one request -------------------------------------------------------------------------------
    def _send_line(self, line: BatchLine, stamp: Stamp) -> SendLine:
        customer, item, event = parse_target_id(line.target_id)
        return SendLine(line.target_id, customer, item, event, line.units, stamp.timestamp, stamp.key)

    async def _send(
        self,
        shard: int,
        seq: int,
        token: str,
        lines: Sequence[tuple[BatchLine, Stamp]],
        report: FlushReport,
        batch: Batch,
        acks: _AckWriter,
        *,
        retries: TaskGroup | None = None,
        failures: int = 0,
        restamps: dict[str, int] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Send one group until Stripe answers for good (or ``retry_attempts`` sends failed).

        With ``retries``, a group that must back off continues in a new task of that group (after
        ``delay``, with its failure count and re-stamp counts), and this call returns.
        """
        if delay:
            await anyio.sleep(delay)
        todo = list(lines)
        restamps = {} if restamps is None else restamps
        while todo:
            wires = [self._send_line(line, stamp) for line, stamp in todo]
            async with self._slots, self._locks.hold(self.sink.lock_key(w) for w in wires):
                if self._bucket is not None:
                    await self._bucket.acquire()
                await self._checkpoint_at("before_send")
                self._sending += 1
                try:
                    outcomes = await self.sink.send(wires)
                finally:
                    self._sending -= 1
                await self._checkpoint_at("sent")
            self._log_outcomes(shard, seq, todo, outcomes, failures + 1)
            delivered = [
                (line.target_id, stamp.raw)
                for (line, stamp), o in zip(todo, outcomes, strict=True)
                if o.kind == "delivered"
            ]
            dead_lines = [
                (line, stamp, o)
                for (line, stamp), o in zip(todo, outcomes, strict=True)
                if o.kind == "dead"
                or (o.kind == "restamp" and restamps.get(line.target_id, 0) >= _MAX_RESTAMPS)
            ]
            dead = [(line.target_id, stamp.raw, o.reason, dict(o.error)) for line, stamp, o in dead_lines]
            acks.add(delivered)
            if dead:
                moved = await self.store.dead_letter(shard, seq, token, dead)
                report.dead += moved
                for line, stamp, o in dead_lines:
                    logger.error(
                        "dead-lettered %s (shard %s batch %s): %s %s",
                        line.target_id,
                        shard,
                        seq,
                        o.reason,
                        dict(o.error),
                        extra=_audit("dead_lettered", shard, seq, line, stamp, o, outcome="dead"),
                    )
            dead_ids = {d[0] for d in dead}
            retry: list[tuple[BatchLine, Stamp]] = []
            retry_after: float | None = None
            for (line, stamp), outcome in zip(todo, outcomes, strict=True):
                if outcome.kind == "restamp" and line.target_id not in dead_ids:
                    new = await self._restamp(shard, seq, token, line, stamp, batch, outcome)
                    restamps[line.target_id] = restamps.get(line.target_id, 0) + 1
                    report.restamped += 1
                    if new is not None:
                        retry.append((line, new))
                elif outcome.kind == "retry":
                    retry.append((line, stamp))
                    retry_after = max(retry_after or 0.0, outcome.retry_after or 0.0) or None
            if any(o.kind == "retry" for o in outcomes):
                await self._checkpoint_at("send_failed")
                failures += 1
                if failures >= self.settings.retry_attempts:
                    reasons = sorted({o.reason for o in outcomes if o.kind == "retry"})
                    logger.warning(
                        "shard %s batch %s: %d line(s) left for a later pass (%s)",
                        shard,
                        seq,
                        len(retry),
                        reasons,
                        extra=_audit(
                            "left_for_later",
                            shard,
                            seq,
                            targets=[line.target_id for line, _ in retry],
                            lines=len(retry),
                            reasons=reasons,
                            attempts=failures,
                            outcome="left",
                        ),
                    )
                    report.left += len(retry)
                    return
                s = self.settings
                wait = backoff_delay(failures, s.retry_backoff, s.retry_backoff_max, retry_after)
                if retries is not None and retry:
                    retries.start_soon(
                        functools.partial(
                            self._send,
                            shard,
                            seq,
                            token,
                            retry,
                            report,
                            batch,
                            acks,
                            failures=failures,
                            restamps=restamps,
                            delay=wait,
                        )
                    )
                    return
                await anyio.sleep(wait)
            todo = retry

    def _log_outcomes(
        self,
        shard: int,
        seq: int,
        sent: Sequence[tuple[BatchLine, Stamp]],
        outcomes: Sequence[Outcome],
        send_attempt: int,
    ) -> None:
        """One record per line Stripe answered: delivered (debug), retry (info); dead-letters log below."""
        debug = logger.isEnabledFor(logging.DEBUG)
        info = logger.isEnabledFor(logging.INFO)
        if not info:
            return
        sink = self.sink.name
        for (line, stamp), outcome in zip(sent, outcomes, strict=True):
            if outcome.kind == "delivered" and debug:
                logger.debug(
                    "delivered %s (shard %s batch %s) attempt %s at %s",
                    line.target_id,
                    shard,
                    seq,
                    stamp.attempt,
                    stamp.timestamp,
                    extra=_audit("delivered", shard, seq, line, stamp, outcome, sink=sink, send=send_attempt),
                )
            elif outcome.kind == "retry":
                logger.info(
                    "retrying %s (shard %s batch %s), send %s: %s %s",
                    line.target_id,
                    shard,
                    seq,
                    send_attempt,
                    outcome.reason,
                    outcome.error.get("message", ""),
                    extra=_audit(
                        "retry",
                        shard,
                        seq,
                        line,
                        stamp,
                        outcome,
                        sink=sink,
                        send=send_attempt,
                        retry_after=outcome.retry_after,
                    ),
                )

    async def _restamp(
        self, shard: int, seq: int, token: str, line: BatchLine, old: Stamp, batch: Batch, outcome: Outcome
    ) -> Stamp | None:
        """Stripe refused the timestamp (its period closed): a new attempt, new timestamp, new key, logged."""
        clock = line.meta.get("test_clock")
        if clock:
            self._clock_cache.pop(clock, None)  # the clock has moved on since this pass started
            now = await self._now(line, batch)
        else:
            now = int(await self._redis_now())
        attempt = old.attempt + 1
        key = line_key(self.layout.namespace, shard, seq, batch.claimed_at_ms, attempt, line.target_id)
        new = await self.store.restamp(shard, seq, token, line.target_id, old, f"{attempt}|{now}|{key}")
        logger.warning(
            "re-stamped %s (shard %s batch %s) from %s to %s as attempt %s: %s",
            line.target_id,
            shard,
            seq,
            old.timestamp,
            now,
            attempt,
            outcome.error.get("message"),
            extra=_audit(
                "restamped",
                shard,
                seq,
                line,
                new,
                outcome,
                previous_timestamp=old.timestamp,
                previous_attempt=old.attempt,
                previous_idempotency_key=old.key,
                new_timestamp=now,
                new_attempt=attempt,
                applied=new is not None,
            ),
        )
        return new

    async def _redis_now(self) -> float:
        assert self._redis is not None
        seconds, micros = await self._redis.time()
        return seconds + micros / 1e6
