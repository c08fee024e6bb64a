"""Resolvers map an API key to its billing target; the cache keeps them off the request path."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from hashlib import blake2b
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from metered_middleware._errors import ConfigurationError, StorageError
from metered_middleware._keys import hash_key
from metered_middleware._target import BillingTarget

__all__ = [
    "CHECK_PREFIX",
    "CachingResolver",
    "CallableResolver",
    "CountedResolver",
    "DictEntries",
    "Entry",
    "EntryTable",
    "Fingerprint",
    "Resolver",
    "StaticResolver",
    "cache_clock",
    "fingerprint",
    "key_hash",
]

# The in-process cache is keyed by a fingerprint of each key: two 64-bit values of a keyed hash, one of the
# key and one of the key behind CHECK_PREFIX. The keyed hash is Python's own ``hash`` of bytes (SipHash
# under a secret drawn when the process starts) where the build uses SipHash for every length: it costs
# ~25 ns and lives in the interpreter's hot code, where SHA-256 measured ~6 us a request in a busy server
# (OpenSSL's code and tables are cold there). The fingerprint never leaves the process; Redis and logs
# only ever see SHA-256 (``hash_key``). Matching a cached fingerprint without its key means hitting 128
# bits the caller never sees, under a per-process secret.
CHECK_PREFIX = b"\x01"
Fingerprint = tuple[int, int]
# A cache entry: (expiry on ``cache_clock``, the fingerprint's second hash, the target or None).
Entry = tuple[float, int, BillingTarget | None]


class EntryTable(Protocol):
    """The cache's entries by first hash, oldest first: the compiled ``KeyTable`` (one cache line an
    entry) where ``_speedups`` is built, else ``DictEntries``."""

    def get(self, first: int, /) -> Entry | None: ...
    def pop(self, first: int, default: None, /) -> Entry | None: ...
    def popoldest(self) -> tuple[int, Entry]: ...
    def __setitem__(self, first: int, entry: Entry, /) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, first: object, /) -> bool: ...
    def clear(self) -> None: ...
    def items(self) -> Iterable[tuple[int, Entry]]: ...


class DictEntries(dict[int, Entry]):
    """The pure-Python ``EntryTable``: a dict, whose insertion order is the eviction order."""

    def popoldest(self) -> tuple[int, Entry]:
        """Remove and return the entry inserted first."""
        first = next(iter(self))
        return first, self.pop(first)


_SECRET = os.urandom(16)


def _keyed_blake2b(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8, key=_SECRET).digest(), "big")


def _choose_key_hash(info: Any) -> Callable[[bytes], int]:
    """Python's ``hash`` when this build is keyed SipHash for inputs of every length, else keyed BLAKE2b.

    A build may use FNV, hash short inputs with a weaker function (``cutoff``), or give 32-bit hashes.
    """
    if info.algorithm.startswith("siphash") and info.hash_bits >= 64 and info.cutoff == 0:
        return hash
    return _keyed_blake2b


key_hash = _choose_key_hash(sys.hash_info)

# The clock the cache's expiries are written and read with. The compiled request path
# (``_speedups.find_cached``) reads CLOCK_MONOTONIC itself, so where it is built every reader and writer
# uses its clock; elsewhere, Python's.
cache_clock: Callable[[], float]
try:
    from metered_middleware._speedups import monotonic as cache_clock
except ImportError:
    cache_clock = time.monotonic


def fingerprint(key: bytes) -> Fingerprint:
    """The cache's name for a key in this process (see the comment on ``CHECK_PREFIX``)."""
    return key_hash(key), key_hash(CHECK_PREFIX + key)


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


@runtime_checkable
class CountedResolver(Protocol):
    """A resolver that counts changes to existing keys (``KeyRegistry``), so a cache can keep an expired
    entry without reading it again when nothing has changed since it was read."""

    async def changes(self) -> int | None:
        """The change count now, or None where changes are not counted."""
        ...

    async def resolve_counted(self, key: str) -> tuple[BillingTarget | None, int | None]:
        """The key's target, and the change count read before it (None where not counted)."""
        ...


class CachingResolver:
    """An in-process cache in front of a resolver, with a positive and a negative TTL.

    Hits cost one table lookup, no Redis. Concurrent misses for one key share a single lookup. When the inner
    resolver fails (Redis down), an expired entry is served rather than refusing a key seen before.
    Entries are keyed by the key's fingerprint (two keyed 64-bit hashes), so no plain key is held even in
    memory: ``_entries`` maps the first hash to (expiry, second hash, target). It is an ``EntryTable``:
    the compiled ``KeyTable`` where the request path is built, in whose slots that path also counts the
    open window's units, else a dict.

    In front of a ``CountedResolver`` (the key registry), a target's entry that expires is kept for another
    TTL without reading it again when the registry's change count is what it was when the entry was read
    (the count is read at most once every ``changes_max_age`` seconds, and the kept entry's new TTL runs
    from that read, so a change made through the registry reaches this cache within one TTL, as without
    the count), and read again at least every ``recheck_after`` seconds whatever the count says. Each time
    the count is read, every entry it keeps that expires within ``renew_ahead`` seconds is kept at once,
    so few expiries reach the general path. Every active key would otherwise cost a full lookup once a
    TTL: ~0.3 ms of a busy server's CPU.
    """

    def __init__(
        self,
        inner: Resolver,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_entries: int = 100_000,
        changes_max_age: float = 1.0,
        recheck_after: float = 600.0,
        renew_ahead: float = 5.0,
    ) -> None:
        self.inner = inner
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.changes_max_age = changes_max_age
        self.recheck_after = recheck_after
        self.renew_ahead = renew_ahead
        self._counted = inner if isinstance(inner, CountedResolver) else None
        # first hash -> (the change count read before its entry, when that entry was read), for targets.
        self._read_at: dict[int, tuple[int, float]] = {}
        self._changes: tuple[float, int] | None = None  # (when read, the count)
        self._count_read: asyncio.Future[int | None] | None = None  # a read of it under way
        # Imported here: the request path's module reads this one's hash and clock at its own import.
        from metered_middleware._fastpath import new_entries

        self._entries: EntryTable = new_entries()
        self._inflight: dict[Fingerprint, asyncio.Future[BillingTarget | None]] = {}
        #: Calls to the inner resolver (cache misses and expiries; concurrent misses for a key count once).
        self.lookups = 0
        #: Lookups that failed and were answered with an expired entry instead.
        self.stale_served = 0
        #: Expired entries kept for another TTL because the registry's change count had not moved.
        self.renewed = 0

    def cached(self, key: str) -> tuple[Fingerprint, BillingTarget | None, bool]:
        """(fingerprint, target, fresh): the fast path the middleware tries before awaiting anything."""
        fp = fingerprint(key.encode())
        entry = self._entries.get(fp[0])
        if entry is not None and entry[1] == fp[1] and entry[0] > cache_clock():
            return fp, entry[2], True
        return fp, None, False

    async def resolve(self, key: str) -> BillingTarget | None:
        """Resolve through the cache."""
        digest, target, fresh = self.cached(key)
        if fresh:
            return target
        return await self.resolve_miss(key, digest)

    async def resolve_miss(self, key: str, fp: Fingerprint) -> BillingTarget | None:
        """Ask the inner resolver, sharing one lookup between concurrent callers."""
        pending = self._inflight.get(fp)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[BillingTarget | None] = asyncio.get_running_loop().create_future()
        self._inflight[fp] = future
        try:
            try:
                try:
                    renewed = await self._renew(fp)
                    if renewed is not None:
                        future.set_result(renewed)
                        return renewed
                    self.lookups += 1
                    if self._counted is not None:
                        target, count = await self._counted.resolve_counted(key)
                        self._note_read(fp[0], target, count)
                    else:
                        target = await self.inner.resolve(key)
                except (StorageError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    # A resolver's own failure (a user callable, a client-library bug under load) must reach
                    # the caller as "metering unavailable", never as a 500 with a stack trace.
                    raise StorageError(f"resolver failed: {type(exc).__name__}") from exc
            except StorageError:
                stale = self._entries.get(fp[0])
                if stale is not None and stale[1] == fp[1] and stale[2] is not None:
                    self.stale_served += 1
                    future.set_result(stale[2])
                    return stale[2]
                raise
            self._store(fp, target)
            future.set_result(target)
            return target
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # the waiters re-raise it; mark it retrieved for the creator
            raise
        finally:
            del self._inflight[fp]

    async def _renew(self, fp: Fingerprint) -> BillingTarget | None:
        """The expired entry's target, kept for another TTL, when the registry has changed nothing since
        the entry was read; else None (and the caller reads the entry again)."""
        first, second = fp
        read = self._read_at.get(first)
        if read is None or self._counted is None or self.ttl <= 0:
            return None
        count, read_at = read
        now = cache_clock()
        if now - read_at >= self.recheck_after:
            return None
        entry = self._entries.get(first)
        if entry is None or entry[1] != second or entry[2] is None:
            return None
        if await self._current_count(now) != count:
            return None  # a change since (or no count): read the entry again
        entry = self._entries.get(first)  # the sweep that came with the count may have kept it already
        if entry is None or entry[1] != second or entry[2] is None:
            return None
        if entry[0] <= cache_clock():
            # Counted from when the count was read, not from now: a change made after that read reaches
            # this entry within one TTL, as it would have without the count.
            assert self._changes is not None
            entry = (self._changes[0] + self.ttl, second, entry[2])
            self._entries[first] = entry
            self.renewed += 1
        return entry[2]

    async def _current_count(self, now: float) -> int | None:
        """The registry's change count, read at most once a ``changes_max_age`` and once at a time: the
        entries kept together expire together, and their first requests all come here at once."""
        changes = self._changes
        # At most half a TTL old, so that an entry kept from it is fresh for at least half a TTL more.
        if changes is not None and now - changes[0] < min(self.changes_max_age, self.ttl / 2):
            return changes[1]
        pending = self._count_read
        if pending is None:
            pending = self._count_read = asyncio.ensure_future(self._read_count(now))
        return await asyncio.shield(pending)

    async def _read_count(self, now: float) -> int | None:
        assert self._counted is not None
        try:
            current = await self._counted.changes()
        except StorageError:
            current = None  # the lookup that follows fails the same way, and serves the entry stale
        finally:
            self._count_read = None
        if current is not None:
            # Stamped with the time before the read: the count is at least as recent as that.
            self._changes = (now, current)
            self._sweep(now, current)
        return current

    def _sweep(self, now: float, count: int) -> None:
        """Keep, with the count just read, every entry read at that count that has expired or expires in
        the next ``renew_ahead`` seconds: each would otherwise reach the general path on its own at its
        expiry to be kept (~0.2 ms of a busy server's CPU), and the request path keeps serving them."""
        horizon, expiry = now + self.renew_ahead, now + self.ttl
        entries = self._entries
        for first, (read_count, read_at) in self._read_at.items():
            if read_count != count or now - read_at >= self.recheck_after:
                continue
            entry = entries.get(first)
            if entry is None or entry[2] is None or entry[0] > horizon:
                continue
            entries[first] = (expiry, entry[1], entry[2])
            self.renewed += 1

    def _note_read(self, first: int, target: BillingTarget | None, count: int | None) -> None:
        if target is None or count is None:
            self._read_at.pop(first, None)
            return
        if len(self._read_at) >= self.max_entries and first not in self._read_at:
            self._read_at.clear()  # bounded: the keys it held are read again at their next expiry
        self._read_at[first] = (count, cache_clock())

    def _store(self, fp: Fingerprint, target: BillingTarget | None) -> None:
        # Two live keys whose first hashes collide (~1e-10 with 100,000 keys) take turns in one slot: each
        # sees the other's entry fail the second hash, so both stay correct and merely miss more often.
        first, second = fp
        ttl = self.ttl if target is not None else self.negative_ttl
        if ttl <= 0:
            self._entries.pop(first, None)
            return
        if len(self._entries) >= self.max_entries and first not in self._entries:
            # Drop the oldest entry: bounded memory under key-guessing floods.
            self._entries.popoldest()
        self._entries[first] = (cache_clock() + ttl, second, target)

    def invalidate(self, key: str | None = None) -> None:
        """Forget one key, or everything (a revoke takes effect at once in this process)."""
        if key is None:
            self._entries.clear()
            self._read_at.clear()
        else:
            first = fingerprint(key.encode())[0]
            self._entries.pop(first, None)
            self._read_at.pop(first, None)
