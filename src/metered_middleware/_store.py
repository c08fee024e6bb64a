"""The counting side of the Redis store: one atomic, idempotent script per coalesced write."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from metered_middleware._errors import LayoutMismatchError, StorageError
from metered_middleware._fastpath import NATIVE, encode_lines
from metered_middleware._guard import LayoutGuard
from metered_middleware._layout import Layout
from metered_middleware._redis import REDIS_FAILURES, hash_sum
from metered_middleware._scripts import script_source
from metered_middleware._target import BillingTarget

__all__ = ["CountStore", "CountWrite", "target_metadata"]

# Usage per period is kept this long after the period ends, for the usage view and reconciliation.
DEFAULT_USAGE_RETENTION = 40 * 24 * 3600
# A writer sends a target's metadata when it changes, and again at least this often (should Redis lose it).
META_RESEND = 300.0


def target_metadata(target: BillingTarget) -> str:
    """What a flusher needs to know about a target beyond its id, as stored beside the pending counts.

    Absent fields are left out rather than stored as null (readers use ``.get``): it is kept per target.
    """
    fields = {
        "subscription": target.subscription,
        "period_start": target.period_start,
        "period_end": target.period_end,
        "test_clock": target.test_clock,
    }
    return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"))


def _meta_key(target: BillingTarget) -> tuple[str | None, int | None, int | None, str | None]:
    return (target.subscription, target.period_start, target.period_end, target.test_clock)


def pack_arguments(args: Iterable[str | int | bytes]) -> bytes:
    """Arguments as the bulk strings of Redis's wire protocol (RESP), without the array header."""
    out: list[bytes] = []
    append = out.append
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        # Header, data and CRLF apart: a line blob (kilobytes) is then copied once, by the join.
        append(b"$%d\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(out)


def pack_commands(commands: Sequence[Sequence[str | int | bytes]]) -> bytes:
    """Commands in Redis's wire protocol (RESP arrays of bulk strings), the bytes redis-py would send.

    redis-py's packer costs a few microseconds of Python per argument; a count write has a dozen.
    """
    return b"".join(b"*%d\r\n%b" % (len(command), pack_arguments(command)) for command in commands)


@dataclass(slots=True)
class CountWrite:
    """One shard's share of a coalesced flush: applied at most once thanks to (writer, seq)."""

    shard: int
    writer: str
    seq: int
    lines: list[tuple[BillingTarget, int]]
    # The script's keys and arguments, built at the first attempt: a retry resends exactly the same write.
    encoded: tuple[list[str], list[Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def units(self) -> int:
        """Units this write carries."""
        return sum(map(itemgetter(1), self.lines))  # no Python frame per line


class CountStore:
    """Adds counted units to a shard's pending counts and to each target's usage for its current period."""

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: Layout,
        *,
        usage_retention: int = DEFAULT_USAGE_RETENTION,
    ) -> None:
        self.redis = redis
        self.layout = layout
        self.usage_retention = usage_retention
        self._count = redis.register_script(script_source("count"))
        self.guard = LayoutGuard(redis, layout)
        # target id -> the target whose metadata this store sent in the last META_RESEND seconds (or an
        # equal one since): unchanged metadata is not resent every window, which would cost a JSON encoding,
        # its bytes on the wire and an HSET per line. The encoder checks an entry by identity alone, so
        # when each was sent is kept apart (a cold read a line less): the send times, and a queue of them
        # in order, from which entries older than META_RESEND are dropped, to be sent again.
        self._meta_sent: dict[str, BillingTarget] = {}
        self._meta_sent_at: dict[str, float] = {}
        self._meta_queue: deque[tuple[float, str]] = deque()
        self._shard_keys: dict[int, list[str]] = {}  # each shard's fixed key names, built once
        self._usage_names: dict[tuple[int, int], list[str]] = {}  # (shard, period start) -> its bucket hashes
        self._packed_names: dict[tuple[str, ...], bytes] = {}  # a write's key names, packed (see `_pack`)

    def _keys_and_args(self, write: CountWrite) -> tuple[list[str], list[Any]]:
        if write.encoded is not None:
            return write.encoded
        layout = self.layout
        shard = write.shard
        sent, sent_at, queue = self._meta_sent, self._meta_sent_at, self._meta_queue
        now = time.monotonic()
        self._forget_metadata_sent_before(now - META_RESEND)

        def decide(target: BillingTarget) -> str | None:
            # Called for a target that is not the very object sent recently (encode_lines checks that). A
            # new object with the same metadata (the cache refreshed the key) is remembered instead, under
            # the first one's send time, so the identity check answers for it from the next window on.
            target_id = target.target_id
            last = sent.get(target_id)
            sent[target_id] = target
            if last is not None and _meta_key(last) == _meta_key(target):
                return None
            sent_at[target_id] = now
            queue.append((now, target_id))
            return target_metadata(target)

        # One blob argument per usage hash ("target\tunits\n" a line; blob 0: lines without a period).
        starts, expire_at, blobs, meta_args = encode_lines(write.lines, self.usage_retention, sent, decide)
        fixed = self._shard_keys.get(shard)
        if fixed is None:
            fixed = self._shard_keys[shard] = [
                layout.targets(shard),
                layout.writers(shard),
                layout.pending_since(shard),
                *layout.pending_keys(shard),
            ]
        keys = [*fixed, *(key for start in starts for key in self._usage_keys(shard, start))]
        write.encoded = (
            keys,
            [write.writer, write.seq, layout.buckets, len(expire_at), *expire_at, *blobs, *meta_args],
        )
        return write.encoded

    def _forget_metadata_sent_before(self, cutoff: float) -> None:
        """Drop what was sent before ``cutoff`` (each target's metadata is sent again at its next line)."""
        sent, sent_at, queue = self._meta_sent, self._meta_sent_at, self._meta_queue
        if len(sent) > 1_000_000 or len(queue) > 2_000_000:
            # Bounded: at worst every target's metadata is sent once more.
            sent.clear()
            sent_at.clear()
            queue.clear()
        while queue and queue[0][0] <= cutoff:
            when, target_id = queue.popleft()
            if sent_at.get(target_id) == when:  # not sent again since (then a later entry is queued)
                del sent_at[target_id]
                sent.pop(target_id, None)

    def _usage_keys(self, shard: int, start: int) -> list[str]:
        names = self._usage_names.get((shard, start))
        if names is None:
            if len(self._usage_names) > 4096:
                self._usage_names.clear()  # bounded: periods roll over, old ones are not written again
            names = self._usage_names[(shard, start)] = self.layout.usage_keys(shard, start)
        return names

    async def apply(self, writes: Sequence[CountWrite]) -> list[bool | BaseException]:
        """Send the writes in one pipeline; each result is True (applied now or before) or the error it met.

        A connection error fails them all; the caller keeps them and retries with the same (writer, seq).
        """
        if not writes:
            return []
        try:
            # Once per store, before its first write (and again after a failure): never a unit counted into
            # a shard that the namespace's flushers do not read.
            await self.guard.check()
        except LayoutMismatchError as exc:
            # Not Redis's fault, but handled as a refused write all the same: the units stay in process,
            # the counter reports them and, in closed mode, requests are refused until the setting is fixed.
            raise StorageError(str(exc)) from exc
        except StorageError as exc:
            raise StorageError(f"count write failed: {exc}") from exc
        for write in writes:
            if write.encoded is None:
                self._keys_and_args(write)  # kept on the write: a retry resends exactly these bytes
                if not NATIVE:
                    # In Python, encoding is ~0.15 ms of loop time per 250 lines: one write (shard) at a
                    # time, then let the requests waiting on the loop run (compiled: ~20 us, no yield).
                    await asyncio.sleep(0)
        if isinstance(self.redis, RedisCluster):
            return await self._apply_cluster(writes)
        try:
            results = await self._pipeline(writes)
            # A Redis that restarted or flushed its scripts answers NOSCRIPT: load it, resend those writes
            # (a resent write is applied once by its (writer, seq), like any retry).
            missing = [n for n, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                await self.redis.script_load(self._count.script)
                for n, again in zip(missing, await self._pipeline([writes[n] for n in missing]), strict=True):
                    results[n] = again
        except REDIS_FAILURES as exc:
            raise StorageError(f"count write failed: {exc}") from exc
        return [r if isinstance(r, BaseException) else True for r in results]

    def _pack(self, writes: Sequence[CountWrite]) -> bytes:
        """The writes' EVALSHAs in Redis's protocol, as ``pack_commands`` would pack them.

        A write names 37 keys (the bucketed hashes), the same few lists window after window: their packed
        bytes are kept per list, which saves most of packing a window (4 writes: ~120 -> ~30 us).
        """
        parts: list[bytes] = []
        cache = self._packed_names
        for write in writes:
            keys, args = self._keys_and_args(write)
            names = tuple(keys)
            packed = cache.get(names)
            if packed is None:
                if len(cache) >= 1024:
                    cache.clear()  # bounded: lists change only as periods roll over
                packed = cache[names] = pack_arguments(keys)
            parts.append(b"*%d\r\n" % (3 + len(keys) + len(args)))
            parts.append(pack_arguments(("EVALSHA", self._count.sha, len(keys))))
            parts.append(packed)
            parts.append(pack_arguments(args))
        return b"".join(parts)

    async def _pipeline(self, writes: Sequence[CountWrite]) -> list[Any]:
        # The writes go out as one packed send on a pooled connection, their replies read in order: what
        # redis-py's Pipeline does, without its bookkeeping (SCRIPT EXISTS for registered scripts, fieldset
        # preparation, response callbacks) and with the one thing it lacks here: redis-py 8's pipeline does
        # not retry a connection Redis has closed (a restart, an idle timeout), which cost a failed window,
        # an error log and, in closed mode, refused requests until the next try.
        payload = self._pack(writes)
        pool = self.redis.connection_pool
        for attempt in (1, 2):
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            timeout = connection.socket_timeout
            try:
                # One deadline for the whole exchange instead of the connection's own per call: with a
                # socket timeout set, redis-py sends through asyncio.wait_for, a task and a loop pass for
                # each send (a fifth of a window's CPU). A hung Redis still fails the write in `timeout`.
                connection.socket_timeout = None
                async with asyncio.timeout(timeout):
                    await connection.send_packed_command(payload)
                    results: list[Any] = []
                    for _ in writes:
                        try:
                            results.append(await connection.read_response())
                        except ResponseError as exc:  # a script error or NOSCRIPT: this write's own answer
                            results.append(exc)
                return results
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await connection.disconnect(nowait=True)
                if attempt == 2:
                    raise
                # A pooled connection Redis dropped (it restarted, or an idle timeout): once more on a fresh
                # one, as redis-py's own retry would. The writes are idempotent by (writer, seq).
            except BaseException:
                await connection.disconnect(nowait=True)  # a cancelled read leaves replies unread
                raise
            finally:
                connection.socket_timeout = timeout
                await pool.release(connection)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _apply_cluster(self, writes: Sequence[CountWrite]) -> list[bool | BaseException]:
        # redis-py's cluster pipeline refuses EVALSHA; each write is single-slot, so sending them concurrently
        # keeps one round trip per node. Per-write errors are returned like the pipeline's, so a write that
        # failed on one node is retried alone with its (writer, seq) while the others count as written.
        async def one(write: CountWrite) -> Any:
            keys, args = self._keys_and_args(write)
            return await self._count(keys=keys, args=args)

        try:
            # Learn the slot map before writing concurrently: racing first commands can trip the client.
            await self.redis.initialize()
        except REDIS_FAILURES as exc:
            raise StorageError(f"count write failed: {exc}") from exc
        results = await asyncio.gather(*(one(w) for w in writes), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and len(errors) == len(results):
            raise StorageError(f"count write failed: {errors[0]}") from errors[0]
        return [r if isinstance(r, BaseException) else True for r in results]

    async def pending(self, shard: int | None = None) -> dict[str, int]:
        """Units counted and not yet claimed, per target id (all shards when ``shard`` is None)."""
        shards: Iterable[int] = range(self.layout.shards) if shard is None else (shard,)
        total: dict[str, int] = {}
        try:
            for s in shards:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name in self.layout.pending_keys(s):
                        pipe.hgetall(name)
                    for raw in await pipe.execute():
                        for field, value in raw.items():
                            key = field.decode() if isinstance(field, bytes) else field
                            total[key] = total.get(key, 0) + int(value)
        except REDIS_FAILURES as exc:
            raise StorageError(f"reading pending counts failed: {exc}") from exc
        return total

    async def period_usage(self, target: BillingTarget) -> int:
        """Units counted for the target in its current period (0 when it has no period)."""
        if target.period_start is None:
            return 0
        names = self.layout.target_usage_keys(target.target_id, target.period_start)
        try:
            return await hash_sum(self.redis, names, target.target_id)
        except REDIS_FAILURES as exc:
            raise StorageError(f"reading usage failed: {exc}") from exc
