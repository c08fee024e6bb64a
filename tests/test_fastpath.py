"""The request path for cached keys: the compiled one and its pure-Python twin give the same answers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from metered_middleware import BillingTarget
from metered_middleware._fastpath import NATIVE, PyCountingSend, PyFastPath, PyTally, py_find_cached
from metered_middleware._resolver import CHECK_PREFIX, cache_clock, fingerprint, key_hash

Finder = Callable[..., BillingTarget | None]
FINDERS: list[Any] = [pytest.param(py_find_cached, id="python")]
SENDS: list[Any] = [pytest.param(PyCountingSend, id="python")]
PATHS: list[Any] = [pytest.param(PyFastPath, id="python")]
TALLIES: list[Any] = [pytest.param(PyTally, id="python")]
if NATIVE:
    from metered_middleware import _speedups

    FINDERS.append(pytest.param(_speedups.find_cached, id="native"))
    SENDS.append(pytest.param(_speedups.CountingSend, id="native"))
    PATHS.append(pytest.param(_speedups.FastPath, id="native"))
    TALLIES.append(pytest.param(_speedups.Tally, id="native"))

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


class Health:
    healthy = True


def fast_path(
    make: Any, *, closed: bool = False, weigh: Any = None, counter: Any = None, excluded: Any = None
) -> tuple[Any, list[Any]]:
    """A fast path over a cache holding KEY (admissible) and OTHER (revoked), and what it adds."""
    added: list[tuple[BillingTarget, int]] = []
    entries = cached(KEY)
    first, second = fingerprint(OTHER)
    entries[first] = (cache_clock() + 60, second, BillingTarget(customer="cus_2", revoked=True))
    path = make(
        entries=entries,
        names=NAMES,
        bearer=True,
        max_length=256,
        add=lambda target, units: added.append((target, units)),
        statuses=frozenset({200}),
        counter=counter or Health(),
        closed=closed,
        weigh=weigh,
        excluded=excluded,
    )
    return path, added


async def ignore(message: Any) -> None:
    """A server's send that drops what it is given."""


def scope_with(key: bytes, **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/v1/x", "headers": [(b"x-api-key", key)], **extra}


@pytest.mark.anyio
@pytest.mark.parametrize("make", PATHS)
async def test_fast_path_admits_a_cached_key_into_state_and_counts_its_response(make: Any) -> None:
    """A cached, admissible key: its target is in the scope's state and a 200 response counts one unit."""
    path, added = fast_path(make)
    scope = scope_with(KEY)  # no state yet: the path makes one
    send = path(scope, ignore)
    assert scope["state"] == {"billing_target": TARGET}
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body"})
    assert added == [(TARGET, 1)]
    kept = scope_with(KEY, state={"user": 1})
    path(kept, ignore)
    assert kept["state"] == {"user": 1, "billing_target": TARGET}


@pytest.mark.parametrize("make", PATHS)
def test_fast_path_leaves_refusals_and_misses_to_the_general_path(make: Any) -> None:
    """A revoked key, an unknown key, no key: None, and the scope is left as it was."""
    path, added = fast_path(make)
    for scope in (scope_with(OTHER), scope_with(b"mm_live_unknown_key_0000000000000000"), scope_with(b"")):
        assert path(scope, ignore) is None
        assert "state" not in scope
    assert path({"type": "http", "headers": []}, ignore) is None
    assert added == []


@pytest.mark.parametrize("make", PATHS)
def test_fast_path_in_closed_mode_refers_requests_while_redis_refuses_counts(make: Any) -> None:
    """With fail mode closed, an unhealthy counter sends every request to the general path (its 503)."""
    counter = Health()
    path, _ = fast_path(make, closed=True, counter=counter)
    assert path(scope_with(KEY), ignore) is not None
    counter.healthy = False
    assert path(scope_with(KEY), ignore) is None
    open_path, _ = fast_path(make, closed=False, counter=counter)
    assert open_path(scope_with(KEY), ignore) is not None


@pytest.mark.anyio
@pytest.mark.parametrize("make", PATHS)
async def test_fast_path_counts_route_weights_and_passes_weightless_routes_through(make: Any) -> None:
    """A route weighing 3 counts 3 units; one weighing 0 gets the server's own send, and counts nothing."""
    path, added = fast_path(make, weigh=lambda scope: 3 if scope["path"] == "/v1/x" else 0)
    send = path(scope_with(KEY), ignore)
    assert send is not ignore
    await send({"type": "http.response.start", "status": 200})
    assert added == [(TARGET, 3)]
    weightless = scope_with(KEY, path="/free")
    assert path(weightless, ignore) is ignore
    assert weightless["state"] == {"billing_target": TARGET}


@pytest.mark.parametrize("make_tally", TALLIES)
def test_tally_sums_units_per_target_keeps_the_latest_target_and_bounds_targets(make_tally: Any) -> None:
    """Units add up per target id (the newest target object kept); past the bound new ids are dropped and
    counted, and every add wakes the writer until the tally is armed."""
    calls: list[str] = []
    tally = make_tally(2, lambda: calls.append("wake"), lambda: calls.append("overflow"))
    renewed = BillingTarget(customer="cus_1", meter_event_name="calls", period_end=2)
    first = BillingTarget(customer="cus_1", meter_event_name="calls", period_end=1)
    tally.add(first, 2)
    tally.add(renewed, 3)
    tally.add(BillingTarget(customer="cus_2"), 1)
    tally.armed = True
    tally.add(BillingTarget(customer="cus_3"), 4)  # a third id: over the bound
    tally.add(first, 1)  # a known id still counts
    assert calls == ["wake", "wake", "wake", "overflow"]
    assert (tally.counted_units, tally.counted_requests, tally.overflow_units) == (11, 5, 4)
    assert len(tally) == 2
    units, targets = tally.take()
    assert units == {first.target_id: 6, "cus_2||": 1}
    assert targets[first.target_id] is first
    assert len(tally) == 0
    assert tally.take() == ({}, {})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("make", "make_tally"),
    [pytest.param(p.values[0], t.values[0], id=p.id) for p, t in zip(PATHS, TALLIES, strict=True)],
)
async def test_fast_path_counts_into_a_tally(make: Any, make_tally: Any) -> None:
    """Given a tally's add, the fast path's sends count into that tally."""
    tally = make_tally(10, lambda: None, lambda: None)
    path = make(
        entries=cached(KEY),
        names=NAMES,
        bearer=True,
        max_length=256,
        add=tally.add,
        statuses=frozenset({200}),
        counter=Health(),
        closed=False,
        weigh=None,
        excluded=None,
    )
    for _ in range(3):
        send = path(scope_with(KEY), ignore)
        await send({"type": "http.response.start", "status": 200})
    assert tally.take()[0] == {TARGET.target_id: 3}


@pytest.mark.parametrize("make", PATHS)
def test_fast_path_passes_excluded_paths_through_and_leaves_unjudged_ones_to_the_general_path(
    make: Any,
) -> None:
    """An excluded path gets the server's send and no target, key or not; a path the general path has not
    judged yet goes there; a path judged metered is metered."""
    judged = {"/health": True, "/v1/x": False}
    path, _ = fast_path(make, excluded=judged)
    health = scope_with(b"", path="/health")
    assert path(health, ignore) is ignore
    assert "state" not in health
    assert path(scope_with(KEY, path="/health"), ignore) is ignore
    assert path(scope_with(KEY, path="/v1/new"), ignore) is None
    metered = scope_with(KEY)
    assert path(metered, ignore) not in (None, ignore)
    assert metered["state"] == {"billing_target": TARGET}
