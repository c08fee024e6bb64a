"""Read-only views of the Redis store for operators: what each shard holds, and one target's usage.

Shared by ``metered-middleware status`` / ``usage`` and the metrics collector. Every read is per shard and
single-slot (a plain pipeline per shard), so it works the same on one Redis and on a Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from metered_middleware._errors import StorageError
from metered_middleware._layout import Layout
from metered_middleware._redis import REDIS_FAILURES, hash_sum

__all__ = ["ShardStatus", "TargetUsage", "read_shards", "redis_time_ms", "target_usage"]

# A shard with more claimed batches than this is reported with the units of the oldest ones only.
_MAX_BATCHES_READ = 200


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard at one moment. Ages are seconds by Redis's clock; None when there is nothing to age."""

    shard: int
    pending_units: int
    pending_targets: int
    pending_age: float | None
    batches: int
    claimed_units: int
    oldest_batch_age: float | None
    lease_holder: str | None
    lease_ttl: float | None
    dead_letters: int
    dead_units: int
    delivered_units: int

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def redis_time_ms(redis: aioredis.Redis) -> int:
    """Redis's clock in milliseconds: every age is measured on the clock the scripts stamp with."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _read_shard(redis: aioredis.Redis, layout: Layout, shard: int, now_ms: int) -> ShardStatus:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(layout.pending_since(shard))
        pipe.zrange(layout.batches(shard), 0, -1, withscores=True)
        pipe.get(layout.lease(shard))
        pipe.pttl(layout.lease(shard))
        pipe.hvals(layout.dead(shard))
        pipe.hvals(layout.delivered(shard))
        for name in layout.pending_keys(shard):
            pipe.hvals(name)
        since, batches, lease, lease_ttl, dead, delivered, *pending = await pipe.execute()
    claimed = 0
    if batches:
        async with redis.pipeline(transaction=False) as pipe:
            for seq, _ in batches[:_MAX_BATCHES_READ]:
                pipe.hgetall(layout.batch(shard, _text(seq)))
            for raw in await pipe.execute():
                claimed += sum(int(v) for k, v in raw.items() if _text(k).startswith("u:"))
    pending_units = sum(int(v) for values in pending for v in values)
    dead_units = sum(int(json.loads(v)["units"]) for v in dead)
    holder = _text(lease).split(":", 1)[-1] if lease else None
    return ShardStatus(
        shard=shard,
        pending_units=pending_units,
        pending_targets=len(pending),
        pending_age=max(0.0, (now_ms - int(since)) / 1000) if pending and since else None,
        batches=len(batches),
        claimed_units=claimed,
        oldest_batch_age=max(0.0, (now_ms - float(batches[0][1])) / 1000) if batches else None,
        lease_holder=holder,
        lease_ttl=lease_ttl / 1000 if lease and lease_ttl and lease_ttl > 0 else None,
        dead_letters=len(dead),
        dead_units=dead_units,
        delivered_units=sum(int(v) for v in delivered),
    )


async def read_shards(redis: aioredis.Redis, layout: Layout) -> list[ShardStatus]:
    """Every shard's pending units and age, batches in flight, lease holder and dead-letter size."""
    try:
        now_ms = await redis_time_ms(redis)
        return [await _read_shard(redis, layout, shard, now_ms) for shard in range(layout.shards)]
    except REDIS_FAILURES as exc:
        raise StorageError(f"reading shard status failed: {exc}") from exc


@dataclass(frozen=True, slots=True)
class TargetUsage:
    """One billing target's units: counted this period, and where the units not yet billed are."""

    target_id: str
    period_start: int | None
    period_end: int | None
    counted: int
    pending: int
    claimed: int
    dead: int
    delivered_all_time: int

    @property
    def delivered(self) -> int:
        """Units of this period Stripe acknowledged: counted minus what still waits or was refused."""
        return max(0, self.counted - self.pending - self.claimed - self.dead)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields, the derived ``delivered`` included."""
        return asdict(self) | {"delivered": self.delivered}


def _period_meta(raw: bytes | str | None) -> Mapping[str, Any]:
    if not raw:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


async def target_usage(
    redis: aioredis.Redis, layout: Layout, target_id: str, *, period_start: int | None = None
) -> TargetUsage:
    """Counted, pending, claimed, dead-lettered and delivered units of one target in one period.

    The period defaults to the latest one the middleware stored for the target. Pending, claimed and
    dead-lettered units are those of that period (lines carry the period they were counted in).
    """
    shard = layout.shard_of(target_id)
    try:
        meta = _period_meta(await redis.hget(layout.targets(shard), target_id))
        start = period_start if period_start is not None else meta.get("period_start")
        end = meta.get("period_end") if start == meta.get("period_start") else None
        counted = 0
        if isinstance(start, int):
            counted = await hash_sum(redis, layout.target_usage_keys(target_id, start), target_id)
        pending = await hash_sum(redis, layout.target_pending_keys(target_id), target_id)
        if meta.get("period_start") != start:
            pending = 0  # pending units belong to the latest period the target was counted in
        claimed = 0
        for seq in await redis.zrange(layout.batches(shard), 0, -1):
            batch = layout.batch(shard, seq.decode() if isinstance(seq, bytes) else str(seq))
            units, line_meta = await redis.hmget(batch, [f"u:{target_id}", f"m:{target_id}"])
            if units and _period_meta(line_meta).get("period_start") == start:
                claimed += int(units)
        dead = 0
        for raw in await redis.hvals(layout.dead(shard)):
            entry = json.loads(raw)
            if entry["target"] == target_id and _period_meta(entry.get("meta")).get("period_start") == start:
                dead += int(entry["units"])
        delivered_all_time = int(await redis.hget(layout.delivered(shard), target_id) or 0)
    except REDIS_FAILURES as exc:
        raise StorageError(f"reading usage of {target_id} failed: {exc}") from exc
    return TargetUsage(
        target_id=target_id,
        period_start=start if isinstance(start, int) else None,
        period_end=end if isinstance(end, int) else None,
        counted=counted,
        pending=pending,
        claimed=claimed,
        dead=dead,
        delivered_all_time=delivered_all_time,
    )
