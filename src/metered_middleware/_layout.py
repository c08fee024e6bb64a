"""Every Redis key name the library uses, in one place.

All keys start with the namespace. Everything one shard's counting and flushing touches carries the hash tag
``{<namespace>-<shard>}``, so a shard lives in one Redis Cluster slot and every script stays single-slot.

A shard's pending counts and its usage per period are each split over ``BUCKETS`` hashes by the target id's
SHA-1 (the count script works the bucket out itself, with ``redis.sha1hex``). Redis keeps a hash of up to 512
fields as one flat list and scans it on every field lookup, and a counted line is two ``HINCRBY``s: in one
hash of 250 targets that cost Redis about 16 us a line, in sixteen of 16 about 5 us, in about the same
memory. The unbucketed names earlier versions wrote (``...:pending``, ``...:usage:<start>``) are still read,
and drained by the claim, so usage counted before an upgrade is neither lost nor billed twice.
"""

from __future__ import annotations

import hashlib
import zlib

__all__ = ["BUCKETS", "Layout"]

# Fixed, not configured: a target's bucket must be the same for every writer and reader. A deployment with
# many keys per shard raises METERED_SHARDS instead (keys / (shards x 16) under about 100 keeps hashes small).
BUCKETS = 16


def bucket_of(target_id: str, buckets: int = BUCKETS) -> int:
    """A target's bucket: the count script's own rule (first four hex digits of the SHA-1, modulo)."""
    return int(hashlib.sha1(target_id.encode(), usedforsecurity=False).hexdigest()[:4], 16) % buckets


class Layout:
    """Key names for a namespace and a shard count."""

    __slots__ = ("buckets", "namespace", "shards")

    def __init__(self, namespace: str = "mm", shards: int = 4) -> None:
        self.namespace = namespace
        self.shards = shards
        self.buckets = BUCKETS

    def shard_of(self, target_id: str) -> int:
        """The shard a billing target is counted in (stable across processes and restarts)."""
        return zlib.crc32(target_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        """The shard's key prefix, hash tag included."""
        return f"{self.namespace}:{{{self.namespace}-{shard}}}"

    def bucket_of(self, target_id: str) -> int:
        """The bucket a billing target's pending and usage fields live in, within its shard."""
        return bucket_of(target_id, self.buckets)

    # -- counting -----------------------------------------------------------------------------------
    def pending(self, shard: int, bucket: int | None = None) -> str:
        """Hash: target id -> units counted and not yet claimed by a flusher, for one bucket of the shard.

        Without a bucket: the shard's unbucketed hash of earlier versions, which the claim still drains.
        """
        name = f"{self.tag(shard)}:pending"
        return name if bucket is None else f"{name}:{bucket}"

    def pending_keys(self, shard: int) -> list[str]:
        """Every hash that can hold a shard's pending units: the unbucketed one, then the buckets in order."""
        return [self.pending(shard), *(self.pending(shard, b) for b in range(self.buckets))]

    def target_pending_keys(self, target_id: str) -> list[str]:
        """The hashes that can hold one target's pending units (the unbucketed one and its bucket)."""
        shard = self.shard_of(target_id)
        return [self.pending(shard), self.pending(shard, self.bucket_of(target_id))]

    def pending_since(self, shard: int) -> str:
        """String: Redis time (ms) when units last arrived in an empty pending hash: its oldest units' age."""
        return f"{self.tag(shard)}:pending_since"

    def targets(self, shard: int) -> str:
        """Hash: target id -> JSON of the latest period bounds, subscription and test clock seen for it."""
        return f"{self.tag(shard)}:targets"

    def usage(self, shard: int, period_start: int, bucket: int | None = None) -> str:
        """Hash: target id -> units counted in the period starting at ``period_start``; expires after it.

        One per bucket; without a bucket, the unbucketed hash earlier versions wrote for the period.
        """
        name = f"{self.tag(shard)}:usage:{period_start}"
        return name if bucket is None else f"{name}:{bucket}"

    def usage_keys(self, shard: int, period_start: int) -> list[str]:
        """The period's usage hashes of a shard, one per bucket, in order (what the count script writes)."""
        return [self.usage(shard, period_start, b) for b in range(self.buckets)]

    def target_usage_keys(self, target_id: str, period_start: int) -> list[str]:
        """The hashes that can hold one target's usage for a period (the unbucketed one and its bucket)."""
        shard = self.shard_of(target_id)
        return [self.usage(shard, period_start), self.usage(shard, period_start, self.bucket_of(target_id))]

    @staticmethod
    def usage_period(key: str) -> int | None:
        """The period start in a usage hash's name (either form), None for another key."""
        _, found, rest = key.rpartition("}:usage:")
        start = rest.split(":", 1)[0]
        return int(start) if found and start.isdigit() else None

    def writers(self, shard: int) -> str:
        """Hash: writer id -> last count-write sequence applied, so a retried write is applied once."""
        return f"{self.tag(shard)}:writers"

    # -- delivery -----------------------------------------------------------------------------------
    def seq(self, shard: int) -> str:
        """String: the last batch number claimed in the shard."""
        return f"{self.tag(shard)}:seq"

    def batches(self, shard: int) -> str:
        """Sorted set: batch numbers still holding undelivered lines, scored by claim time."""
        return f"{self.tag(shard)}:batches"

    def batch(self, shard: int, seq: int | str) -> str:
        """Hash: one claimed, immutable batch."""
        return f"{self.tag(shard)}:batch:{seq}"

    def lease(self, shard: int) -> str:
        """String with TTL: the token of the flusher that owns the shard."""
        return f"{self.tag(shard)}:lease"

    def fence(self, shard: int) -> str:
        """String: the fencing counter, bumped at every lease acquisition."""
        return f"{self.tag(shard)}:fence"

    def dead(self, shard: int) -> str:
        """Hash: dead-lettered lines Stripe refused for good, kept with Stripe's error until re-driven."""
        return f"{self.tag(shard)}:dead"

    def delivered(self, shard: int) -> str:
        """Hash: target id -> units Stripe acknowledged (for usage views and reconciliation)."""
        return f"{self.tag(shard)}:delivered"

    # -- the layout itself (not sharded) ----------------------------------------------------------------
    def record(self) -> str:
        """String: the namespace's shard and bucket counts as JSON, set by the first writer or flusher."""
        return f"{self.namespace}:layout"

    # -- key registry (not sharded: looked up by key hash) ---------------------------------------------------
    def key(self, key_hash: str) -> str:
        """Hash: one API key's registry entry, addressed by the key's SHA-256."""
        return f"{self.namespace}:key:{key_hash}"

    def key_ids(self) -> str:
        """Hash: short key id -> key hash (for revoke/list by id)."""
        return f"{self.namespace}:keyids"

    def key_changes(self) -> str:
        """String: a counter bumped with every change to an existing key's entry (a revocation, a
        subscription's new status or period), so caches can tell that an entry they hold is still current."""
        return f"{self.namespace}:keychanges"

    def customer_keys(self, customer: str) -> str:
        """Set: key hashes of a customer."""
        return f"{self.namespace}:customer:{customer}:keys"

    def subscription_keys(self, subscription: str) -> str:
        """Set: key hashes attached to a subscription (webhooks update them together)."""
        return f"{self.namespace}:subscription:{subscription}:keys"
