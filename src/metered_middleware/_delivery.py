"""The delivery side of the Redis store: leases, claimed batches, stamps, acks and the dead-letter.

Every mutation is one Lua script, fenced by the shard's lease token where it touches a batch, so a
flusher that lost its lease can neither acknowledge nor dead-letter what another flusher now owns
(DESIGN invariant 4).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from metered_middleware._errors import MeteringError, StorageError
from metered_middleware._layout import Layout
from metered_middleware._redis import REDIS_FAILURES
from metered_middleware._scripts import script_source

__all__ = [
    "Batch",
    "BatchLine",
    "DeadLetter",
    "DeliveryStore",
    "LeaseLostError",
    "Stamp",
    "line_key",
]

_T = TypeVar("_T")


class LeaseLostError(MeteringError):
    """The flusher no longer holds the shard's lease; whatever it was doing is left for the new holder."""


def line_key(namespace: str, shard: int, seq: int, claimed_at_ms: int, attempt: int, target: str) -> str:
    """The idempotency key / meter event identifier of one attempt of one line.

    A pure function of the stored batch, so every retry repeats it. The claim time is hashed in as
    well: if Redis ever lost its data and batch numbers restarted, a new line would still never reuse
    an old line's key.
    """
    digest = hashlib.sha256(
        f"{namespace}|{shard}|{seq}|{claimed_at_ms}|{attempt}|{target}".encode()
    ).hexdigest()
    return f"{namespace}-{shard}-{seq}-{attempt}-{digest[:32]}"


@dataclass(frozen=True, slots=True)
class Stamp:
    """The parameters fixed for one attempt of a line: sent identically until Stripe answers for good."""

    attempt: int
    timestamp: int
    key: str
    first_attempt_ms: int
    raw: str

    @classmethod
    def parse(cls, raw: str) -> Stamp:
        """Read the stored ``attempt|timestamp|key|first_attempt_ms`` form."""
        attempt, timestamp, key, first = raw.split("|")
        return cls(int(attempt), int(timestamp), key, int(first), raw)


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One target's claimed units in a batch, with the metadata it was claimed with."""

    shard: int
    seq: int
    claimed_at_ms: int
    target_id: str
    units: int
    meta: Mapping[str, Any]
    stamp: Stamp | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """A claimed, immutable batch: what is left of it to deliver, and Redis time when it was read."""

    shard: int
    seq: int
    claimed_at_ms: int
    lines: list[BatchLine]
    read_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A line Stripe refused for good (or that outlived deduplication), kept with Stripe's error."""

    id: str
    shard: int
    seq: int
    target_id: str
    units: int
    reason: str
    error: Mapping[str, Any]
    stamp: str
    at_ms: int
    meta: Mapping[str, Any] = field(default_factory=dict)


def _meta(raw: str | bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DeliveryStore:
    """Redis operations of the flusher, one atomic script each. Errors come out as ``StorageError``."""

    def __init__(self, redis: aioredis.Redis, layout: Layout) -> None:
        self.redis = redis
        self.layout = layout
        register = redis.register_script
        self._lease = register(script_source("lease"))
        self._release = register(script_source("release"))
        self._claim = register(script_source("claim"))
        self._stamp = register(script_source("stamp"))
        self._restamp = register(script_source("restamp"))
        self._ack = register(script_source("ack"))
        self._dead = register(script_source("dead"))
        self._dead_take = register(script_source("dead_take"))

    async def _call(self, what: str, op: Awaitable[_T]) -> _T:
        try:
            return await op
        except REDIS_FAILURES as exc:
            raise StorageError(f"{what} failed: {exc}") from exc

    # -- leases ------------------------------------------------------------------------------------
    async def acquire_lease(
        self, shard: int, owner: str, ttl_ms: int, token: str | None = None
    ) -> str | None:
        """Renew ``token`` or take a free lease: the token held now, or None if another holds it."""
        keys = [self.layout.lease(shard), self.layout.fence(shard)]
        result = await self._call("lease", self._lease(keys=keys, args=[token or "", owner, ttl_ms]))
        return _text(result) if result else None

    async def release_lease(self, shard: int, token: str) -> bool:
        """Give the lease back if still held, so another flusher need not wait for it to expire."""
        keys = [self.layout.lease(shard)]
        return bool(await self._call("lease release", self._release(keys=keys, args=[token])))

    # -- batches -----------------------------------------------------------------------------------
    async def claim(self, shard: int, token: str, max_lines: int) -> tuple[int, int, int] | None:
        """Claim up to ``max_lines`` pending targets into a new batch: (seq, claimed_at_ms, lines) or None."""
        layout = self.layout
        keys = [
            layout.targets(shard),
            layout.seq(shard),
            layout.batches(shard),
            layout.lease(shard),
            *layout.pending_keys(shard),
        ]
        args: list[Any] = [token, layout.batch(shard, ""), max_lines]
        result = await self._call("claim", self._claim(keys=keys, args=args))
        if result == -1:
            raise LeaseLostError(f"shard {shard}: lease lost before claiming")
        if not result:
            return None
        seq, claimed_at, lines = (int(v) for v in result)
        return seq, claimed_at, lines

    async def batch_seqs(self, shard: int) -> list[int]:
        """Numbers of the batches still holding lines, oldest claim first."""
        raw = await self._call("batches", self.redis.zrange(self.layout.batches(shard), 0, -1))
        return [int(v) for v in raw if isinstance(v, bytes | str)]

    async def load(self, shard: int, seq: int) -> Batch | None:
        """Read what is left of a batch (None once fully delivered), with Redis's current time."""

        async def op() -> tuple[dict[bytes, bytes], Any]:
            if isinstance(self.redis, RedisCluster):
                # The cluster pipeline refuses TIME: two commands (any node's clock: they share one source).
                return await self.redis.hgetall(self.layout.batch(shard, seq)), await self.redis.time()
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.layout.batch(shard, seq))
                pipe.time()
                raw, now = await pipe.execute()
            return raw, now

        raw, now = await self._call("batch read", op())
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        claimed_at = int(fields.get("claimed_at", 0))
        lines = [
            BatchLine(
                shard=shard,
                seq=seq,
                claimed_at_ms=claimed_at,
                target_id=name[2:],
                units=int(value),
                meta=_meta(fields.get("m:" + name[2:])),
                stamp=Stamp.parse(s) if (s := fields.get("s:" + name[2:])) else None,
            )
            for name, value in fields.items()
            if name.startswith("u:")
        ]
        lines.sort(key=lambda line: line.target_id)
        read_at = int(now[0]) * 1000 + int(now[1]) // 1000
        return Batch(shard, seq, claimed_at, lines, read_at)

    async def stamp(
        self, shard: int, seq: int, token: str, stamps: Sequence[tuple[str, str]]
    ) -> list[Stamp | None]:
        """Store ``attempt|timestamp|key`` for lines without a stamp; the stamp each line now carries."""
        if not stamps:
            return []
        keys = [self.layout.lease(shard), self.layout.batch(shard, seq)]
        args: list[str] = [token]
        for target, stamp in stamps:
            args += [target, stamp]
        result = await self._call("stamp", self._stamp(keys=keys, args=args))
        if result == -1:
            raise LeaseLostError(f"shard {shard}: lease lost before stamping batch {seq}")
        return [Stamp.parse(_text(v)) if v else None for v in result]

    async def restamp(
        self, shard: int, seq: int, token: str, target: str, old: Stamp, new: str
    ) -> Stamp | None:
        """Replace ``old`` with a new attempt ``attempt|timestamp|key``; None if the line changed."""
        keys = [self.layout.lease(shard), self.layout.batch(shard, seq)]
        args = [token, target, old.raw, new]
        result = await self._call("restamp", self._restamp(keys=keys, args=args))
        if result == -1:
            raise LeaseLostError(f"shard {shard}: lease lost before re-stamping batch {seq}")
        return Stamp.parse(_text(result)) if result else None

    async def ack(self, shard: int, seq: int, token: str, lines: Iterable[tuple[str, str]]) -> int:
        """Acknowledge (target, stamp sent) pairs; how many were acknowledged now."""
        args: list[str] = [token, str(seq)]
        for target, stamp in lines:
            args += [target, stamp]
        if len(args) == 2:
            return 0
        layout = self.layout
        keys = [layout.lease(shard), layout.batch(shard, seq), layout.batches(shard), layout.delivered(shard)]
        result = await self._call("acknowledge", self._ack(keys=keys, args=args))
        if result == -1:
            raise LeaseLostError(f"shard {shard}: lease lost before acknowledging batch {seq}")
        return int(result)

    async def dead_letter(
        self,
        shard: int,
        seq: int,
        token: str,
        lines: Iterable[tuple[str, str, str, Mapping[str, Any]]],
    ) -> int:
        """Move (target, stamp sent, reason, error) lines to the dead-letter; how many were moved now."""
        args: list[str] = [token, str(seq)]
        for target, stamp, reason, error in lines:
            args += [target, stamp, reason, json.dumps(error, default=str)]
        if len(args) == 2:
            return 0
        layout = self.layout
        keys = [layout.lease(shard), layout.batch(shard, seq), layout.batches(shard), layout.dead(shard)]
        result = await self._call("dead-letter", self._dead(keys=keys, args=args))
        if result == -1:
            raise LeaseLostError(f"shard {shard}: lease lost before dead-lettering batch {seq}")
        return int(result)

    # -- dead-letter operations --------------------------------------------------------------------
    def _shards(self, shard: int | None) -> range | tuple[int]:
        return range(self.layout.shards) if shard is None else (shard,)

    async def dead_letters(self, shard: int | None = None) -> list[DeadLetter]:
        """Dead-lettered lines (of one shard or all), oldest first; ids are ``<shard>:<seq>:<target>``."""
        out: list[DeadLetter] = []
        for s in self._shards(shard):
            raw = await self._call("dead-letter read", self.redis.hgetall(self.layout.dead(s)))
            for name, value in raw.items():
                entry = json.loads(value)
                out.append(
                    DeadLetter(
                        id=f"{s}:{_text(name)}",
                        shard=s,
                        seq=int(entry["seq"]),
                        target_id=entry["target"],
                        units=int(entry["units"]),
                        reason=entry["reason"],
                        error=_meta(entry["error"]),
                        stamp=entry["stamp"],
                        at_ms=int(entry["at"]),
                        meta=_meta(entry["meta"]),
                    )
                )
        out.sort(key=lambda d: (d.at_ms, d.id))
        return out

    async def _take_dead(self, mode: str, ids: Iterable[str], item: str = "") -> list[DeadLetter]:
        by_shard: dict[int, list[str]] = {}
        for entry_id in ids:
            shard_text, _, rest = entry_id.partition(":")
            if not shard_text.isdigit() or not rest or int(shard_text) >= self.layout.shards:
                raise ValueError(f"not a dead-letter id: {entry_id!r}")
            by_shard.setdefault(int(shard_text), []).append(rest)
        wanted = {f"{s}:{rest}" for s, rests in by_shard.items() for rest in rests}
        before = {d.id: d for d in await self.dead_letters() if d.id in wanted}
        taken: list[DeadLetter] = []
        for s, rests in by_shard.items():
            buckets = [self.layout.pending(s, b) for b in range(self.layout.buckets)]
            keys = [self.layout.dead(s), self.layout.targets(s), *buckets]
            result = await self._call(
                f"dead-letter {mode}",
                self._dead_take(keys=keys, args=[mode, item, *rests]),
            )
            for raw in result:
                entry = json.loads(raw)
                entry_id = f"{s}:{entry['seq']}:{entry['target']}"
                if entry_id in before:
                    taken.append(before[entry_id])
        return taken

    async def redrive(self, ids: Iterable[str], *, subscription_item: str | None = None) -> list[DeadLetter]:
        """Put dead-lettered lines back into pending (a new batch, a new key); the entries moved.

        ``subscription_item`` re-targets them, e.g. onto the item that replaced a deleted one.
        """
        if subscription_item is not None and "|" in subscription_item:
            raise ValueError(f"not a subscription item: {subscription_item!r}")
        return await self._take_dead("retry", ids, subscription_item or "")

    async def discard(self, ids: Iterable[str]) -> list[DeadLetter]:
        """Remove dead-lettered lines for good (an operator's decision); the entries removed."""
        return await self._take_dead("discard", ids)

    # -- inspection --------------------------------------------------------------------------------
    async def totals(self) -> dict[str, dict[str, int]]:
        """Units per target in each state: ``pending``, ``claimed``, ``dead`` and ``delivered``."""
        out: dict[str, dict[str, int]] = {"pending": {}, "claimed": {}, "dead": {}, "delivered": {}}

        def add(state: str, target: str, units: int) -> None:
            out[state][target] = out[state].get(target, 0) + units

        for s in self._shards(None):
            for key in self.layout.pending_keys(s):
                pending = await self._call("read", self.redis.hgetall(key))
                for name, value in pending.items():
                    add("pending", _text(name), int(value))
            delivered = await self._call("read", self.redis.hgetall(self.layout.delivered(s)))
            for name, value in delivered.items():
                add("delivered", _text(name), int(value))
            for seq in await self.batch_seqs(s):
                batch = await self.load(s, seq)
                for line in batch.lines if batch else ():
                    add("claimed", line.target_id, line.units)
        for dead in await self.dead_letters():
            add("dead", dead.target_id, dead.units)
        return out
