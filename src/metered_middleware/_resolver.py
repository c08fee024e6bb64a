"""Resolvers map an API key to its billing target; the cache keeps them off the request path."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from metered_middleware._errors import ConfigurationError, StorageError
from metered_middleware._keys import hash_key
from metered_middleware._target import BillingTarget

__all__ = ["CachingResolver", "CallableResolver", "Resolver", "StaticResolver"]


@runtime_checkable
class Resolver(Protocol):
    """Anything that maps an API key to a ``BillingTarget`` (None when the key is unknown).

    A revoked key should come back with ``revoked=True`` rather than None, so callers are told why.
    Raise ``StorageError`` when the answer cannot be known right now.
    """

    async def resolve(self, key: str) -> BillingTarget | None:
        """Return the key's target, or None for an unknown key."""
        ...


class CallableResolver:
    """Adapts any ``async def (key) -> BillingTarget | None`` into a ``Resolver``."""

    def __init__(self, func: Callable[[str], Awaitable[BillingTarget | None]]) -> None:
        self._func = func

    async def resolve(self, key: str) -> BillingTarget | None:
        """Call the wrapped function."""
        return await self._func(key)


class StaticResolver:
    """A fixed mapping, for small deployments: keys are hashed on load and only the hashes are kept.

    ``mapping`` maps a key, or ``"sha256:<hex>"`` of one, to a ``BillingTarget`` or a dict of its fields.
    """

    def __init__(
        self,
        mapping: Mapping[str, BillingTarget | Mapping[str, Any]],
        *,
        pepper: str | None = None,
    ) -> None:
        self._pepper = pepper
        self._targets: dict[str, BillingTarget] = {}
        for key, value in mapping.items():
            target = (
                value
                if isinstance(value, BillingTarget)
                else BillingTarget.from_fields({k: str(v) for k, v in value.items()})
            )
            digest = key[7:] if key.startswith("sha256:") else hash_key(key, pepper)
            self._targets[digest] = target

    @classmethod
    def from_setting(cls, raw: str, *, pepper: str | None = None) -> StaticResolver:
        """Build from ``METERED_STATIC_KEYS``: a JSON object, or ``@path`` to a JSON file."""
        name = "METERED_STATIC_KEYS"
        try:
            text = Path(raw[1:]).read_text(encoding="utf-8") if raw.startswith("@") else raw
            data = json.loads(text)
        except (OSError, ValueError) as exc:
            shown = raw if raw.startswith("@") else "<json>"
            raise ConfigurationError(name, shown, f"a JSON object or @file ({exc})") from None
        if not isinstance(data, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("customer"), str) for v in data.values()
        ):
            raise ConfigurationError(name, "<json>", 'an object of key -> {"customer": "cus_...", ...}')
        return cls(data, pepper=pepper)

    async def resolve(self, key: str) -> BillingTarget | None:
        """Look the key's hash up in the mapping."""
        return self._targets.get(hash_key(key, self._pepper))


class CachingResolver:
    """An in-process cache in front of a resolver, with a positive and a negative TTL.

    Hits cost one dict lookup, no Redis. Concurrent misses for one key share a single lookup. When the inner
    resolver fails (Redis down), an expired entry is served rather than refusing a key seen before.
    Entries are keyed by the key's SHA-256, so no plain key is held even in memory.
    """

    def __init__(
        self,
        inner: Resolver,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_entries: int = 100_000,
    ) -> None:
        self.inner = inner
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, BillingTarget | None]] = {}
        self._inflight: dict[bytes, asyncio.Future[BillingTarget | None]] = {}

    def cached(self, key: str) -> tuple[bytes, BillingTarget | None, bool]:
        """(digest, target, fresh): the fast path the middleware tries before awaiting anything."""
        digest = hashlib.sha256(key.encode()).digest()
        entry = self._entries.get(digest)
        if entry is not None and entry[0] > time.monotonic():
            return digest, entry[1], True
        return digest, None, False

    async def resolve(self, key: str) -> BillingTarget | None:
        """Resolve through the cache."""
        digest, target, fresh = self.cached(key)
        if fresh:
            return target
        return await self.resolve_miss(key, digest)

    async def resolve_miss(self, key: str, digest: bytes) -> BillingTarget | None:
        """Ask the inner resolver, sharing one lookup between concurrent callers."""
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[BillingTarget | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            try:
                try:
                    target = await self.inner.resolve(key)
                except (StorageError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    # A resolver's own failure (a user callable, a client-library bug under load) must reach
                    # the caller as "metering unavailable", never as a 500 with a stack trace.
                    raise StorageError(f"resolver failed: {type(exc).__name__}") from exc
            except StorageError:
                stale = self._entries.get(digest)
                if stale is not None and stale[1] is not None:
                    future.set_result(stale[1])
                    return stale[1]
                raise
            self._store(digest, target)
            future.set_result(target)
            return target
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # the waiters re-raise it; mark it retrieved for the creator
            raise
        finally:
            del self._inflight[digest]

    def _store(self, digest: bytes, target: BillingTarget | None) -> None:
        ttl = self.ttl if target is not None else self.negative_ttl
        if ttl <= 0:
            self._entries.pop(digest, None)
            return
        if len(self._entries) >= self.max_entries and digest not in self._entries:
            # dicts keep insertion order: drop the oldest entry (bounded memory under key-guessing floods).
            self._entries.pop(next(iter(self._entries)))
        self._entries[digest] = (time.monotonic() + ttl, target)

    def invalidate(self, key: str | None = None) -> None:
        """Forget one key, or everything (a revoke takes effect at once in this process)."""
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(hashlib.sha256(key.encode()).digest(), None)
