"""The request path for cached keys: the compiled one and its pure-Python twin give the same answers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from metered_middleware import BillingTarget
from metered_middleware._fastpath import NATIVE, PyCountingSend, py_find_cached
from metered_middleware._resolver import CHECK_PREFIX, cache_clock, fingerprint, key_hash

Finder = Callable[..., BillingTarget | None]
FINDERS: list[Any] = [pytest.param(py_find_cached, id="python")]
SENDS: list[Any] = [pytest.param(PyCountingSend, id="python")]
if NATIVE:
    from metered_middleware import _speedups

    FINDERS.append(pytest.param(_speedups.find_cached, id="native"))
    SENDS.append(pytest.param(_speedups.CountingSend, id="native"))

KEY = b"mm_live_0123456789abcdefghijklmnopqrstuv"
OTHER = b"mm_live_zyxwvutsrqponmlkjihgfedcba987654"
TARGET = BillingTarget(customer="cus_1", meter_event_name="calls")
NAMES = (b"x-api-key",)


def cached(*keys: bytes, ttl: float = 60.0) -> dict[int, tuple[float, int, BillingTarget | None]]:
    """A resolver cache holding the given keys, the way CachingResolver stores them."""
    entries: dict[int, tuple[float, int, BillingTarget | None]] = {}
    for key in keys:
        first, second = fingerprint(key)
        entries[first] = (cache_clock() + ttl, second, TARGET)
    return entries


@pytest.mark.parametrize("find", FINDERS)
@pytest.mark.parametrize(
    ("headers", "hit"),
    [
        ([(b"host", b"t"), (b"authorization", b"Bearer " + KEY)], True),
        ([(b"authorization", b"bearer " + KEY)], True),
        ([(b"authorization", b"BEARER " + KEY)], True),
        ([(b"x-api-key", KEY), (b"accept", b"*/*")], True),
        ([(b"authorization", b"Basic " + KEY)], False),
        ([(b"authorization", b"Bearer")], False),
        ([(b"authorization", b"Bearer " + KEY), (b"x-api-key", KEY)], False),  # two keys, even equal
        ([(b"authorization", b"Bearer " + KEY), (b"authorization", b"Bearer " + OTHER)], False),
        ([(b"x-api-key", OTHER)], False),  # not cached
        ([(b"x-api-key", KEY + b" ")], False),  # padded: the general path judges it
        ([(b"X-API-Key", KEY)], False),  # ASGI header names are lower-case; anything else is unusual
        ([(b"host", b"t")], False),
        ([], False),
    ],
)
def test_finds_only_the_single_cached_key(
    find: Finder, headers: list[tuple[bytes, bytes]], hit: bool
) -> None:
    """A cached key in a Bearer or key header is found; every other shape is left to the general path."""
    assert find(headers, cached(KEY), NAMES, True, 256) is (TARGET if hit else None)


@pytest.mark.parametrize("find", FINDERS)
def test_bearer_off_ignores_the_authorization_header(find: Finder) -> None:
    """With Bearer keys turned off, an Authorization header is neither a key nor a second key."""
    entries = cached(KEY)
    assert find([(b"authorization", b"Bearer " + KEY)], entries, NAMES, False, 256) is None
    headers = [(b"authorization", b"Bearer " + OTHER), (b"x-api-key", KEY)]
    assert find(headers, entries, NAMES, False, 256) is TARGET


@pytest.mark.parametrize("find", FINDERS)
def test_an_entry_is_served_only_with_its_second_hash_and_before_expiry(find: Finder) -> None:
    """A planted first hash with the wrong second hash, an expired entry or a negative one: no target."""
    headers = [(b"x-api-key", KEY)]
    first, second = fingerprint(KEY)
    assert find(headers, {first: (cache_clock() + 60, second ^ 1, TARGET)}, NAMES, True, 256) is None
    assert find(headers, {first: (cache_clock() - 0.001, second, TARGET)}, NAMES, True, 256) is None
    assert find(headers, {first: (cache_clock() + 60, second, None)}, NAMES, True, 256) is None
    assert find(headers, {first: (cache_clock() + 60, second, TARGET)}, NAMES, True, 256) is TARGET


@pytest.mark.parametrize("find", FINDERS)
def test_keys_longer_than_the_limit_are_not_looked_up(find: Finder) -> None:
    """The length limit holds on the fast path too, including keys past the compiled path's stack buffer."""
    for length in (255, 256, 257, 300, 4096):
        key = b"k" * length
        entries = cached(key)
        got = find([(b"x-api-key", key)], entries, NAMES, True, 256)
        assert got is (TARGET if length <= 256 else None)
        assert find([(b"x-api-key", key)], entries, NAMES, True, 4096) is TARGET


@pytest.mark.parametrize("find", FINDERS)
def test_keys_are_named_as_the_resolver_names_them(find: Finder) -> None:
    """The lookup computes the resolver's own fingerprint (so it finds what the resolver cached)."""
    for key in (b"a", KEY, bytes(range(1, 256)) * 3):
        entries = {key_hash(key): (cache_clock() + 60, key_hash(CHECK_PREFIX + key), TARGET)}
        assert find([(b"x-api-key", key)], entries, NAMES, True, 4096) is TARGET


def test_the_cache_clock_is_the_one_the_lookup_reads() -> None:
    """Expiries are written with the clock the request path compares them to, and it is monotonic time."""
    try:
        from metered_middleware._speedups import monotonic
    except ImportError:
        monotonic = time.monotonic
    assert cache_clock is monotonic
    assert abs(cache_clock() - time.monotonic()) < 0.5


@pytest.mark.anyio
@pytest.mark.parametrize("make_send", SENDS)
@pytest.mark.parametrize(
    ("messages", "counted"),
    [
        ([{"type": "http.response.start", "status": 200}, {"type": "http.response.body"}], 1),
        ([{"type": "http.response.start", "status": 404}, {"type": "http.response.body"}], 0),
        ([{"type": "http.response.body", "status": 200}], 0),
        ([{"type": "websocket.accept"}], 0),
    ],
)
async def test_counting_send_counts_a_counted_status_once_and_passes_everything_on(
    make_send: Any, messages: list[dict[str, Any]], counted: int
) -> None:
    """Each message reaches the server's send unchanged; only a counted response start adds units."""
    seen: list[dict[str, Any]] = []
    added: list[tuple[BillingTarget, int]] = []

    async def send(message: Any) -> None:
        seen.append(message)

    counting = make_send(
        send, TARGET, 3, lambda target, units: added.append((target, units)), frozenset({200})
    )
    for message in messages:
        await counting(message)
    assert seen == messages
    assert added == [(TARGET, 3)] * counted


@pytest.mark.anyio
@pytest.mark.parametrize("make_send", SENDS)
async def test_counting_send_lets_errors_through(make_send: Any) -> None:
    """A failing count or a failing send raises to the app, as any send error does."""

    async def send(message: Any) -> None:
        raise OSError("disconnected")

    def add(target: BillingTarget, units: int) -> None:
        raise RuntimeError("counter broke")

    with pytest.raises(RuntimeError, match="counter broke"):
        await make_send(send, TARGET, 1, add, frozenset({200}))(
            {"type": "http.response.start", "status": 200}
        )
    with pytest.raises(OSError, match="disconnected"):
        await make_send(send, TARGET, 1, add, frozenset({200}))({"type": "http.response.body"})
