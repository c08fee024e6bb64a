"""The key registry in Redis: API keys stored by their SHA-256 only, each mapped to a billing target."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from metered_middleware._errors import StorageError
from metered_middleware._keys import generate_key, hash_key, key_id_of
from metered_middleware._layout import Layout
from metered_middleware._redis import REDIS_FAILURES, read_with_retry
from metered_middleware._target import BillingTarget

__all__ = ["IssuedKey", "KeyRecord", "KeyRegistry"]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A registry entry as an operator sees it: never the key itself."""

    key_id: str
    target: BillingTarget
    created: int
    revoked_at: int | None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly created key. ``key`` is shown once and never stored."""

    key: str
    record: KeyRecord

    @property
    def key_id(self) -> str:
        """The key's public identifier."""
        return self.record.key_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


class KeyRegistry:
    """Create, revoke, rotate and list API keys; also the default ``Resolver``.

    Only ``hash_key(key, pepper)`` ever reaches Redis. Lookups by ``key_id`` (a prefix of the hash) serve
    operators, who never hold the key after it was shown.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        namespace: str = "mm",
        pepper: str | None = None,
        key_prefix: str = "mk_",
    ) -> None:
        self.redis = redis
        self.layout = Layout(namespace)
        self.pepper = pepper
        self.key_prefix = key_prefix
        # Registry keys are not hash-tagged (they are found by key hash), so on a cluster they span slots
        # and a MULTI across them is refused; there the writes go as a plain pipeline, each idempotent.
        self._atomic = not isinstance(redis, RedisCluster)

    async def resolve(self, key: str) -> BillingTarget | None:
        """The target of a key, or None when the registry does not know it (revoked keys are returned)."""
        record = await self._record(hash_key(key, self.pepper))
        return None if record is None else record.target

    async def changes(self) -> int | None:
        """How many times existing keys' entries have changed (revocations, subscription updates), or None
        where that is not tracked (Redis Cluster, where a change and its count cannot be written together).

        The count and the entry change in one transaction, so an entry read after a count, with that count
        unchanged since, is the entry as it is now (``CachingResolver`` keeps such entries without reading
        them again).
        """
        if not self._atomic:
            return None
        try:
            raw = await read_with_retry(lambda: self.redis.get(self.layout.key_changes()))
        except REDIS_FAILURES as exc:
            raise StorageError(f"reading the key change count failed: {exc}") from exc
        return int(raw or 0)

    async def resolve_counted(self, key: str) -> tuple[BillingTarget | None, int | None]:
        """``resolve`` and the change count read just before the entry (``changes``; None on a cluster)."""
        if not self._atomic:
            return await self.resolve(key), None
        key_hash = hash_key(key, self.pepper)

        async def read() -> list[Any]:
            # One connection, in order: the count is read before the entry, so a change made in between
            # leaves the count older than the entry, and the cache reads the entry again next time.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(self.layout.key_changes())
                pipe.hgetall(self.layout.key(key_hash))
                result: list[Any] = await pipe.execute()
                return result

        try:
            count, raw = await read_with_retry(read)
        except REDIS_FAILURES as exc:
            raise StorageError(f"key lookup failed: {exc}") from exc
        record = self._parse(key_hash, raw)
        return (None if record is None else record.target), int(count or 0)

    async def _hash_of(self, key_or_id: str) -> str | None:
        """Accept a key, a key id, or a full hash, and return the stored hash."""
        try:
            if key_or_id.startswith("key_"):
                found = await self.redis.hget(self.layout.key_ids(), key_or_id)
                return _text(found) if found else None
            key_hash = hash_key(key_or_id, self.pepper)
            if await self.redis.exists(self.layout.key(key_hash)):
                return key_hash
        except REDIS_FAILURES as exc:
            raise StorageError(f"key lookup failed: {exc}") from exc
        return None

    async def create(self, target: BillingTarget, *, label: str | None = None) -> IssuedKey:
        """Mint a key for the target; the returned ``IssuedKey.key`` is the only copy there will be."""
        key = generate_key(self.key_prefix)
        key_hash = hash_key(key, self.pepper)
        key_id = key_id_of(key_hash)
        now = int(time.time())
        stored = replace(target, key_id=key_id, revoked=False)
        fields: dict[Any, Any] = stored.to_fields() | {"created": str(now)}
        if label:
            fields["label"] = label
        try:
            async with self.redis.pipeline(transaction=self._atomic) as pipe:
                pipe.hset(self.layout.key(key_hash), mapping=fields)
                pipe.hset(self.layout.key_ids(), key_id, key_hash)
                pipe.sadd(self.layout.customer_keys(target.customer), key_hash)
                if target.subscription:
                    pipe.sadd(self.layout.subscription_keys(target.subscription), key_hash)
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise StorageError(f"creating a key failed: {exc}") from exc
        return IssuedKey(key, KeyRecord(key_id, stored, now, None, label))

    async def revoke(self, key_or_id: str) -> KeyRecord | None:
        """Revoke a key (by the key or its id). Returns the record, or None when unknown."""
        key_hash = await self._hash_of(key_or_id)
        if key_hash is None:
            return None
        now = int(time.time())
        try:
            # HSETNX keeps the first revocation time when a key is revoked twice. The change count goes up
            # with it, in the same transaction: caches elsewhere read the entry again at its expiry.
            async with self.redis.pipeline(transaction=self._atomic) as pipe:
                pipe.hset(self.layout.key(key_hash), "revoked", "1")
                pipe.hsetnx(self.layout.key(key_hash), "revoked_at", str(now))
                pipe.incr(self.layout.key_changes())
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise StorageError(f"revoking a key failed: {exc}") from exc
        return await self._record(key_hash)

    async def rotate(self, key_or_id: str) -> IssuedKey | None:
        """Issue a new key for the same target and revoke the old one."""
        key_hash = await self._hash_of(key_or_id)
        if key_hash is None:
            return None
        record = await self._record(key_hash)
        if record is None:
            return None
        issued = await self.create(record.target, label=record.label)
        await self.revoke(record.key_id)
        return issued

    async def _record(self, key_hash: str) -> KeyRecord | None:
        try:
            raw = await read_with_retry(lambda: self.redis.hgetall(self.layout.key(key_hash)))
        except REDIS_FAILURES as exc:
            raise StorageError(f"key lookup failed: {exc}") from exc
        return self._parse(key_hash, raw)

    @staticmethod
    def _parse(key_hash: str, raw: Any) -> KeyRecord | None:
        if not raw:
            return None
        fields = _decode(raw)
        revoked_at = fields.get("revoked_at")
        return KeyRecord(
            key_id=fields.get("key_id") or key_id_of(key_hash),
            target=BillingTarget.from_fields(fields),
            created=int(fields.get("created", "0")),
            revoked_at=int(revoked_at) if revoked_at else None,
            label=fields.get("label"),
        )

    async def get(self, key_or_id: str) -> KeyRecord | None:
        """The record of a key (by the key or its id), or None."""
        key_hash = await self._hash_of(key_or_id)
        return None if key_hash is None else await self._record(key_hash)

    async def list(self, customer: str | None = None) -> list[KeyRecord]:
        """Every key's record, or a customer's, oldest first."""
        try:
            if customer is not None:
                hashes = [_text(h) for h in await self.redis.smembers(self.layout.customer_keys(customer))]
            else:
                hashes = [_text(h) for h in await self.redis.hvals(self.layout.key_ids())]
        except REDIS_FAILURES as exc:
            raise StorageError(f"listing keys failed: {exc}") from exc
        records = [r for h in hashes if (r := await self._record(h)) is not None]
        return sorted(records, key=lambda r: (r.created, r.key_id))

    async def update_subscription(
        self,
        subscription: str,
        *,
        status: str | None = None,
        period_start: int | None = None,
        period_end: int | None = None,
        subscription_item: str | None = None,
        test_clock: str | None = None,
    ) -> int:
        """Apply a subscription's new status or period to every key on it (webhooks call this).

        Returns how many keys were updated.
        """
        fields: dict[Any, Any] = {}
        for name, value in (
            ("status", status),
            ("period_start", period_start),
            ("period_end", period_end),
            ("subscription_item", subscription_item),
            ("test_clock", test_clock),
        ):
            if value is not None:
                fields[name] = str(value)
        if not fields:
            return 0
        try:
            hashes = await self.redis.smembers(self.layout.subscription_keys(subscription))
            async with self.redis.pipeline(transaction=self._atomic) as pipe:
                for key_hash in hashes:
                    pipe.hset(self.layout.key(_text(key_hash)), mapping=fields)
                pipe.incr(self.layout.key_changes())  # with the entries, in the same transaction
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise StorageError(f"updating subscription {subscription} failed: {exc}") from exc
        return len(hashes)
