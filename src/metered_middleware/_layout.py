"""Every Redis key name the library uses, in one place.

All keys start with the namespace. Everything one shard's counting and flushing touches carries the hash tag
``{<namespace>-<shard>}``, so a shard lives in one Redis Cluster slot and every script stays single-slot.
"""

from __future__ import annotations

import zlib

__all__ = ["Layout"]


class Layout:
    """Key names for a namespace and a shard count."""

    __slots__ = ("namespace", "shards")

    def __init__(self, namespace: str = "mm", shards: int = 4) -> None:
        self.namespace = namespace
        self.shards = shards

    def shard_of(self, target_id: str) -> int:
        """The shard a billing target is counted in (stable across processes and restarts)."""
        return zlib.crc32(target_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        """The shard's key prefix, hash tag included."""
        return f"{self.namespace}:{{{self.namespace}-{shard}}}"

    # -- counting -----------------------------------------------------------------------------------
    def pending(self, shard: int) -> str:
        """Hash: target id -> units counted and not yet claimed by a flusher."""
        return f"{self.tag(shard)}:pending"

    def pending_since(self, shard: int) -> str:
        """String: Redis time (ms) when units last arrived in an empty pending hash: its oldest units' age."""
        return f"{self.tag(shard)}:pending_since"

    def targets(self, shard: int) -> str:
        """Hash: target id -> JSON of the latest period bounds, subscription and test clock seen for it."""
        return f"{self.tag(shard)}:targets"

    def usage(self, shard: int, period_start: int) -> str:
        """Hash: target id -> units counted in the period starting at ``period_start``; expires after it."""
        return f"{self.tag(shard)}:usage:{period_start}"

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

    # -- key registry (not sharded: looked up by key hash) ---------------------------------------------------
    def key(self, key_hash: str) -> str:
        """Hash: one API key's registry entry, addressed by the key's SHA-256."""
        return f"{self.namespace}:key:{key_hash}"

    def key_ids(self) -> str:
        """Hash: short key id -> key hash (for revoke/list by id)."""
        return f"{self.namespace}:keyids"

    def customer_keys(self, customer: str) -> str:
        """Set: key hashes of a customer."""
        return f"{self.namespace}:customer:{customer}:keys"

    def subscription_keys(self, subscription: str) -> str:
        """Set: key hashes attached to a subscription (webhooks update them together)."""
        return f"{self.namespace}:subscription:{subscription}:keys"
