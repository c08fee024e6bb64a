"""Resolvers and the in-process cache in front of them."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from metered_middleware import (
    BillingTarget,
    CachingResolver,
    CallableResolver,
    ConfigurationError,
    StaticResolver,
    StorageError,
    hash_key,
)
from metered_middleware._resolver import _choose_key_hash, fingerprint

pytestmark = pytest.mark.anyio

T = BillingTarget(customer="cus_1", subscription_item="si_1")


class Counting:
    """A resolver that counts its calls and can be made to fail."""

    def __init__(self, answer: BillingTarget | None) -> None:
        self.calls = 0
        self.answer = answer
        self.fail = False

    async def resolve(self, key: str) -> BillingTarget | None:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.fail:
            raise StorageError("down")
        return self.answer


async def test_hits_stay_in_process_until_ttl() -> None:
    """Within the positive TTL the inner resolver is asked once."""
    inner = Counting(T)
    cache = CachingResolver(inner, ttl=60)
    for _ in range(5):
        assert await cache.resolve("k") == T
    assert inner.calls == 1


async def test_negative_answers_are_cached_for_the_negative_ttl() -> None:
    """Unknown keys are remembered briefly, blunting key-guessing floods, then asked again."""
    inner = Counting(None)
    # Long enough that a stalled CI machine cannot expire it between the first two calls.
    cache = CachingResolver(inner, ttl=60, negative_ttl=0.5)
    assert await cache.resolve("guess") is None
    assert await cache.resolve("guess") is None
    assert inner.calls == 1
    await asyncio.sleep(0.55)
    assert await cache.resolve("guess") is None
    assert inner.calls == 2


async def test_expired_entry_is_refreshed_so_revocation_shows_within_ttl() -> None:
    """After the positive TTL the inner resolver's new answer (e.g. revoked) is seen."""
    inner = Counting(T)
    cache = CachingResolver(inner, ttl=0.05)
    assert await cache.resolve("k") == T
    inner.answer = BillingTarget(customer="cus_1", revoked=True)
    await asyncio.sleep(0.06)
    target = await cache.resolve("k")
    assert target is not None
    assert target.revoked


async def test_concurrent_misses_share_one_lookup() -> None:
    """A burst of requests with a new key costs one lookup."""
    inner = Counting(T)
    cache = CachingResolver(inner)
    results = await asyncio.gather(*(cache.resolve("k") for _ in range(20)))
    assert results == [T] * 20
    assert inner.calls == 1
    assert cache.lookups == 1  # what metered_key_lookups reports


async def test_stale_entry_served_when_inner_fails() -> None:
    """When Redis is down, a key seen before keeps resolving; a new one raises StorageError."""
    inner = Counting(T)
    cache = CachingResolver(inner, ttl=0.01)
    await cache.resolve("k")
    await asyncio.sleep(0.02)
    inner.fail = True
    assert await cache.resolve("k") == T
    with pytest.raises(StorageError):
        await cache.resolve("never-seen")
    assert (cache.lookups, cache.stale_served) == (3, 1)  # an operator sees the outage being bridged


async def test_cache_is_bounded() -> None:
    """The cache never holds more than max_entries keys."""
    cache = CachingResolver(Counting(None), max_entries=10)
    for i in range(50):
        await cache.resolve(f"k{i}")
    assert len(cache._entries) == 10


class Counted(Counting):
    """A resolver that also counts changes to its keys, as the key registry does."""

    def __init__(self, answer: BillingTarget | None) -> None:
        super().__init__(answer)
        self.count: int | None = 7
        self.count_reads = 0
        self.count_fails = False

    async def changes(self) -> int | None:
        self.count_reads += 1
        if self.count_fails:
            raise StorageError("down")
        return self.count

    async def resolve_counted(self, key: str) -> tuple[BillingTarget | None, int | None]:
        count = self.count  # read before the entry, as the registry does
        return await self.resolve(key), count


async def resolve_across_expiry(cache: CachingResolver, key: str) -> BillingTarget | None:
    """Resolve ``key``, wait past a 50 ms TTL, and resolve it again; the second answer."""
    await cache.resolve(key)
    await asyncio.sleep(0.06)
    return await cache.resolve(key)


async def test_an_expired_entry_is_kept_while_the_change_count_stands_still() -> None:
    """In front of a counted resolver, an expired target is kept for another TTL without a lookup; once
    the count moves, the next expiry reads the entry again and sees its new answer."""
    inner = Counted(T)
    cache = CachingResolver(inner, ttl=0.4, changes_max_age=0)
    assert await cache.resolve("k") == T
    for renewals in (1, 2):
        await asyncio.sleep(0.41)
        assert await cache.resolve("k") == T
        assert (inner.calls, cache.lookups, cache.renewed) == (1, 1, renewals)
        assert cache.cached("k")[2]  # fresh again: the request path serves it without a lookup
    revoked = BillingTarget(customer="cus_1", revoked=True)
    inner.answer, inner.count = revoked, 8  # a revocation, counted with it
    assert await cache.resolve("k") == T  # within the TTL, as before
    await asyncio.sleep(0.41)
    assert await cache.resolve("k") == revoked
    assert (inner.calls, cache.lookups, cache.renewed) == (2, 2, 2)


async def test_the_change_count_is_read_once_for_every_key_expiring_together() -> None:
    """The count is read at most once a ``changes_max_age``, whatever the number of keys expiring."""
    inner = Counted(T)
    cache = CachingResolver(inner, ttl=0.05, changes_max_age=60)
    for n in range(20):
        await cache.resolve(f"k{n}")
    await asyncio.sleep(0.06)
    for n in range(20):
        assert await cache.resolve(f"k{n}") == T
    assert (inner.calls, inner.count_reads, cache.renewed) == (20, 1, 20)


async def test_reading_the_count_keeps_every_entry_due_soon_so_the_request_path_keeps_serving_them() -> None:
    """The first expiry that reads the count keeps, at once, every entry read at that count that has
    expired or expires within ``renew_ahead``; entries due later keep their own expiry."""
    inner = Counted(T)
    cache = CachingResolver(inner, ttl=1.0, changes_max_age=0, renew_ahead=0.3)
    for n in range(5):
        await cache.resolve(f"k{n}")
    await asyncio.sleep(0.6)
    await cache.resolve("late")  # expires 0.6 s after the others
    await asyncio.sleep(0.5)
    assert not any(cache.cached(f"k{n}")[2] for n in range(5))  # all five expired
    assert await cache.resolve("k0") == T
    assert all(cache.cached(f"k{n}")[2] for n in range(5))  # kept together, with one count read
    assert (inner.calls, inner.count_reads, cache.renewed) == (6, 1, 5)
    late, kept = cache._entries.get(fingerprint(b"late")[0]), cache._entries.get(fingerprint(b"k0")[0])
    assert late is not None
    assert kept is not None
    assert late[0] < kept[0] - 0.3  # not due soon: left as it was


async def test_keys_expiring_together_share_one_count_read() -> None:
    """Entries kept together expire together: their first requests, all at once, read the count once
    between them, and the one sweep that comes with it keeps every entry."""
    inner = Counted(T)
    cache = CachingResolver(inner, ttl=0.05, changes_max_age=0)
    for n in range(20):
        await cache.resolve(f"k{n}")
    await asyncio.sleep(0.06)
    assert await asyncio.gather(*(cache.resolve(f"k{n}") for n in range(20))) == [T] * 20
    assert (inner.calls, inner.count_reads, cache.renewed) == (20, 1, 20)


async def test_an_entry_kept_by_the_count_is_read_again_after_recheck_after() -> None:
    """However long the count stands still, an entry is read in full again every ``recheck_after``."""
    inner = Counted(T)
    cache = CachingResolver(inner, ttl=0.05, changes_max_age=0, recheck_after=0.6)
    await resolve_across_expiry(cache, "k")
    assert (inner.calls, cache.renewed) == (1, 1)
    await asyncio.sleep(0.6)  # 0.66 s since the entry was read
    await cache.resolve("k")
    assert (inner.calls, cache.renewed) == (2, 1)


async def test_no_count_or_a_failed_count_means_a_lookup_and_negatives_are_never_kept() -> None:
    """Where the count is not kept (a cluster: None) or cannot be read, an expired entry is looked up as
    before (and served stale if that fails too); unknown keys keep their negative TTL."""
    inner = Counted(T)
    inner.count = None
    cache = CachingResolver(inner, ttl=0.05, changes_max_age=0)
    await resolve_across_expiry(cache, "k")
    assert (inner.calls, cache.renewed) == (2, 0)

    inner = Counted(T)
    cache = CachingResolver(inner, ttl=0.05, changes_max_age=0)
    await cache.resolve("k")
    await asyncio.sleep(0.06)
    inner.count_fails = inner.fail = True  # Redis is down
    assert await cache.resolve("k") == T
    assert (inner.calls, cache.renewed, cache.stale_served) == (2, 0, 1)

    inner = Counted(None)
    cache = CachingResolver(inner, ttl=60, negative_ttl=0.05, changes_max_age=0)
    await resolve_across_expiry(cache, "guess")
    assert (inner.calls, cache.renewed) == (2, 0)


async def test_invalidating_a_key_forgets_when_it_was_read() -> None:
    """A key invalidated here (revoked in this process) is looked up in full at its next request."""
    inner = Counted(T)
    cache = CachingResolver(inner, ttl=0.05, changes_max_age=0)
    await cache.resolve("k")
    cache.invalidate("k")
    await cache.resolve("k")
    assert (inner.calls, cache.renewed) == (2, 0)


async def test_static_resolver_hashes_keys_on_load(tmp_path: Path) -> None:
    """Static keys resolve by hash; the JSON may give keys or their sha256."""
    raw = {
        "plain_key_1": {"customer": "cus_a", "subscription_item": "si_a"},
        "sha256:" + hash_key("secret_key_2"): {"customer": "cus_b", "status": "canceled"},
    }
    file = tmp_path / "keys.json"
    file.write_text(json.dumps(raw))
    for resolver in (StaticResolver.from_setting(json.dumps(raw)), StaticResolver.from_setting(f"@{file}")):
        a = await resolver.resolve("plain_key_1")
        b = await resolver.resolve("secret_key_2")
        assert a is not None
        assert a.subscription_item == "si_a"
        assert b is not None
        assert not b.active
        assert await resolver.resolve("other") is None
    assert "plain_key_1" not in repr(StaticResolver.from_setting(json.dumps(raw)).__dict__)


@pytest.mark.parametrize("raw", ["not json", "[1,2]", '{"k": {"no_customer": 1}}', "@/does/not/exist"])
def test_static_resolver_bad_setting(raw: str) -> None:
    """A malformed METERED_STATIC_KEYS names the variable."""
    with pytest.raises(ConfigurationError, match="METERED_STATIC_KEYS"):
        StaticResolver.from_setting(raw)


async def test_callable_resolver() -> None:
    """Any async callable can be the resolver."""

    async def lookup(key: str) -> BillingTarget | None:
        return T if key == "good" else None

    resolver = CallableResolver(lookup)
    assert await resolver.resolve("good") == T
    assert await resolver.resolve("bad") is None


async def test_a_cold_cache_under_a_thousand_concurrent_misses_resolves_every_key(redis_url: str) -> None:
    """A thousand keys missing at once queue for the bounded pool instead of tripping connect timeouts."""
    from metered_middleware import KeyRegistry
    from metered_middleware._redis import MAX_CONNECTIONS, connect

    client = connect(redis_url)
    try:
        registry = KeyRegistry(client, namespace="cold")
        keys = [(await registry.create(BillingTarget(customer=f"cus_{n}"))).key for n in range(1000)]
        cache = CachingResolver(registry)
        found = await asyncio.gather(*(cache.resolve(k) for k in keys))
        assert [t.customer for t in found if t is not None] == [f"cus_{n}" for n in range(1000)]
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= MAX_CONNECTIONS
    finally:
        await client.aclose()


async def test_the_cache_holds_no_key_and_checks_a_second_hash() -> None:
    """Entries are named by two keyed hashes, and an entry whose second hash differs is never served.

    Two keys whose first hashes collided would share a slot: each must see a miss, not the other's target.
    """
    inner = Counting(T)
    cache = CachingResolver(inner, ttl=60)
    key = "mk_live_" + "a" * 43
    assert await cache.resolve(key) == T
    ((first, (_, second, target)),) = cache._entries.items()
    assert (first, second) == fingerprint(key.encode())
    assert target == T
    assert key.encode() not in repr(cache._entries).encode()
    # Plant another target under the same first hash with the wrong second hash: a collision, by hand.
    other = BillingTarget(customer="cus_other", subscription_item="si_other")
    cache._entries[first] = (float("inf"), second ^ 1, other)
    assert cache.cached(key)[2] is False
    assert await cache.resolve(key) == T
    assert inner.calls == 2


async def test_a_colliding_entry_is_not_served_as_stale_either() -> None:
    """While the inner resolver is down, only the key's own expired entry may stand in for it."""
    inner = Counting(T)
    cache = CachingResolver(inner, ttl=60)
    key = "mk_live_" + "b" * 43
    first, second = fingerprint(key.encode())
    cache._entries[first] = (0.0, second ^ 1, BillingTarget(customer="cus_other"))
    inner.fail = True
    with pytest.raises(StorageError):
        await cache.resolve(key)
    cache._entries[first] = (0.0, second, T)  # the key's own entry, expired
    assert await cache.resolve(key) == T


def test_key_hash_is_pythons_siphash_or_keyed_blake2b() -> None:
    """A build without keyed 64-bit SipHash for every length gets keyed BLAKE2b: 64 bits, secret, stable."""

    def info(algorithm: str, bits: int = 64, cutoff: int = 0) -> SimpleNamespace:
        return SimpleNamespace(algorithm=algorithm, hash_bits=bits, cutoff=cutoff)

    assert _choose_key_hash(info("siphash13")) is hash
    assert _choose_key_hash(info("siphash24")) is hash
    for weaker in (info("fnv"), info("siphash13", bits=32), info("siphash13", cutoff=7)):
        chosen = _choose_key_hash(weaker)
        assert chosen is not hash
        values = {chosen(b"mk_live_%d" % n) for n in range(1000)}
        assert len(values) == 1000
        assert all(0 <= v < 2**64 for v in values)
        assert chosen(b"mk_live_1") == chosen(b"mk_live_1")
        # Keyed: not the plain BLAKE2b of the input, which anyone could compute.
        plain = int.from_bytes(hashlib.blake2b(b"mk_live_1", digest_size=8).digest(), "big")
        assert chosen(b"mk_live_1") != plain
