"""The namespace's layout, recorded in Redis at first use, so that no process counts or flushes it under
another one.

Every key a target's counts live in follows from the shard count (CRC-32 of the target id, modulo it) and
the bucket count. A process started with another ``METERED_SHARDS`` would count into shards no flusher of the
old count reads, and its flushers would never claim the old shards' pending units: money kept in Redis and
billed to nobody, silently. So the first writer or flusher records the layout (``SET NX``), and every other
one compares before it writes or claims anything, and refuses a difference with ``LayoutMismatchError``.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from metered_middleware._errors import LayoutMismatchError, StorageError
from metered_middleware._layout import Layout
from metered_middleware._redis import REDIS_FAILURES, read_with_retry

__all__ = ["LayoutGuard"]


class LayoutGuard:
    """Checks one process's layout against the namespace's record, once per process (the answer is kept)."""

    __slots__ = ("_checked", "layout", "redis")

    def __init__(self, redis: aioredis.Redis, layout: Layout) -> None:
        self.redis = redis
        self.layout = layout
        self._checked = False

    @property
    def configured(self) -> dict[str, int]:
        """This process's layout, as it is recorded."""
        return {"shards": self.layout.shards, "buckets": self.layout.buckets}

    async def check(self, *, record: bool = True) -> None:
        """Return when the namespace's recorded layout is this one (recording it first where none is, unless
        ``record`` is false: readers such as ``status`` record nothing).

        Raises ``LayoutMismatchError`` for a different layout, ``StorageError`` when Redis cannot answer (the
        caller tries again before its next write: nothing is written unchecked).
        """
        if self._checked:
            return
        key = self.layout.record()
        configured = self.configured
        try:
            if record:
                # Two commands: Redis 6.2 refuses SET's NX and GET together. Whoever sets first wins; a
                # process racing it with another layout then reads the winner's and is refused.
                await read_with_retry(
                    lambda: self.redis.set(key, json.dumps(configured, sort_keys=True), nx=True), attempts=2
                )
            raw = await read_with_retry(lambda: self.redis.get(key), attempts=2)
        except REDIS_FAILURES as exc:
            raise StorageError(f"reading the namespace's layout failed: {exc}") from exc
        if raw is None:
            return  # nothing recorded and nothing to record (a reader): nothing has counted yet
        try:
            recorded = json.loads(raw)
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):
            recorded = {"shards": "unreadable", "buckets": "unreadable"}
        if recorded.get("shards") != configured["shards"] or recorded.get("buckets") != configured["buckets"]:
            raise LayoutMismatchError(self.layout.namespace, key, recorded, configured)
        self._checked = True
