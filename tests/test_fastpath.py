"""The request path for cached keys: the compiled one and its pure-Python twin give the same answers."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from metered_middleware import BillingTarget
from metered_middleware._fastpath import (
    NATIVE,
    PyCountingSend,
    PyFastPath,
    PyTally,
    py_encode_lines,
    py_find_cached,
    py_group_by_shard,
)
from metered_middleware._layout import Layout
from metered_middleware._resolver import CHECK_PREFIX, cache_clock, fingerprint, key_hash

Finder = Callable[..., BillingTarget | None]
FINDERS: list[Any] = [pytest.param(py_find_cached, id="python")]
SENDS: list[Any] = [pytest.param(PyCountingSend, id="python")]
PATHS: list[Any] = [pytest.param(PyFastPath, id="python")]
TALLIES: list[Any] = [pytest.param(PyTally, id="python")]
GROUPERS: list[Any] = [pytest.param(py_group_by_shard, id="python")]
ENCODERS: list[Any] = [pytest.param(py_encode_lines, id="python")]
if NATIVE:
    from metered_middleware import _speedups

    def table_of(entries: Any) -> _speedups.KeyTable:
        """The same entries in the compiled table the resolver cache uses where it is built."""
        table = _speedups.KeyTable()
        for first, entry in entries.items():
            table[first] = entry
        return table

    def find_in_table(headers: Any, entries: Any, *args: Any) -> BillingTarget | None:
        return _speedups.find_cached(headers, table_of(entries), *args)

    def table_path(**kwargs: Any) -> _speedups.FastPath:
        return _speedups.FastPath(**{**kwargs, "entries": table_of(kwargs["entries"])})

    FINDERS.append(pytest.param(_speedups.find_cached, id="native"))
    FINDERS.append(pytest.param(find_in_table, id="native-table"))
    SENDS.append(pytest.param(_speedups.CountingSend, id="native"))
    PATHS.append(pytest.param(_speedups.FastPath, id="native"))
    PATHS.append(pytest.param(table_path, id="native-table"))
    TALLIES.append(pytest.param(_speedups.Tally, id="native"))
    GROUPERS.append(pytest.param(_speedups.group_by_shard, id="native"))
    ENCODERS.append(pytest.param(_speedups.encode_lines, id="native"))
# Each fast path with the tally it counts into.
PATH_TALLIES: list[Any] = [
    pytest.param(p.values[0], (TALLIES[-1] if NATIVE and p.id != "python" else TALLIES[0]).values[0], id=p.id)
    for p in PATHS
]

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


def random_headers(rnd: random.Random, keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Zero to four headers as a client could send them: key headers and others, Bearer prefixes right
    and wrong, cached keys and random bytes of any length (past the limits too)."""
    names = [b"authorization", b"x-api-key", b"x-other-key", b"host", b"Authorization", b"x-api-ke"]
    prefixes = [
        b"",
        b"Bearer ",
        b"bearer ",
        b"BEARER ",
        b"BeArEr ",
        b"Bearer",
        b"Bearer  ",
        b"Basic ",
        b"bearer\t",
    ]
    headers = []
    for _ in range(rnd.randrange(5)):
        if rnd.random() < 0.5:
            key = rnd.choice(keys)
        else:
            key = bytes(
                rnd.randrange(256) for _ in range(rnd.choice([0, 1, 6, 7, 8, 63, 64, 65, 255, 256, 257, 600]))
            )
        headers.append((rnd.choice(names), rnd.choice(prefixes) + key))
    return headers


@pytest.mark.parametrize("find", FINDERS)
def test_the_lookup_agrees_with_the_twin_on_random_headers(find: Finder) -> None:
    """Whatever headers a client sends, each lookup gives the twin's answer: the same target or none."""
    rnd = random.Random(11)
    keys = [
        b"mm_live_" + bytes(rnd.randrange(33, 127) for _ in range(rnd.randrange(1, 300))) for _ in range(20)
    ]
    entries: dict[int, tuple[float, int, BillingTarget | None]] = {}
    for n, key in enumerate(keys):
        first, second = fingerprint(key)
        target = BillingTarget(customer=f"cus_{n}") if n % 5 else None  # some negative entries
        entries[first] = (cache_clock() + (60 if n % 7 else -1), second, target)  # some expired
    twin: Finder = py_find_cached  # over a plain dict, as the cases above
    hits = 0
    for _ in range(5000):
        headers = random_headers(rnd, keys)
        bearer, limit = rnd.random() < 0.8, rnd.choice([7, 64, 256, 4096])
        expected = twin(headers, entries, NAMES, bearer, limit)
        assert find(headers, entries, NAMES, bearer, limit) is expected, (headers, bearer, limit)
        hits += expected is not None
    assert hits > 50  # the draw reaches the cache, not only the refusals


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
    for kind in ("websocket", "lifespan"):  # other scope types, even with a cached key: the general path's
        other = scope_with(KEY, type=kind)
        assert path(other, ignore) is None
        assert "state" not in other
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


def tally_path(make: Any, entries: Any, tally: Any) -> Any:
    """A fast path over these cache entries that counts 200s into the tally."""
    return make(
        entries=entries,
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


@pytest.mark.anyio
@pytest.mark.parametrize(("make", "make_tally"), PATH_TALLIES)
async def test_fast_path_counts_into_a_tally(make: Any, make_tally: Any) -> None:
    """Given a tally's add, the fast path's sends count into that tally."""
    tally = make_tally(10, lambda: None, lambda: None)
    path = tally_path(make, cached(KEY), tally)
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


class RenamedTarget(BillingTarget):
    """A subclass: the compiled path reads BillingTarget's own slots directly and anything else by name."""

    __slots__ = ()


@pytest.mark.anyio
@pytest.mark.parametrize(("make", "make_tally"), PATH_TALLIES)
async def test_targets_of_a_subclass_are_admitted_and_counted_alike(make: Any, make_tally: Any) -> None:
    """A BillingTarget subclass (an app's own) is admitted, refused and counted by its fields, like the
    class itself."""
    tally = make_tally(10, lambda: None, lambda: None)
    entries = cached(KEY)
    first, second = fingerprint(OTHER)
    entries[first] = (cache_clock() + 60, second, RenamedTarget(customer="cus_r", revoked=True))
    sub = RenamedTarget(customer="cus_s", meter_event_name="calls")
    entries[fingerprint(KEY)[0]] = (cache_clock() + 60, fingerprint(KEY)[1], sub)
    path = tally_path(make, entries, tally)
    assert path(scope_with(OTHER), ignore) is None  # revoked, read through the subclass
    send = path(scope_with(KEY), ignore)
    await send({"type": "http.response.start", "status": 200})
    assert tally.take() == ({"cus_s||calls": 1}, {"cus_s||calls": sub})


def random_id(rnd: random.Random) -> str:
    alphabet = "abcxyz_019é€😀"  # non-ASCII too: the shard is the CRC-32 of the id's UTF-8
    return "cus_" + "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 30)))


@pytest.mark.parametrize("group", GROUPERS)
@pytest.mark.parametrize("shards", [1, 3, 4, 16])
def test_a_window_is_grouped_by_the_layouts_shard_in_buffer_order(group: Any, shards: int) -> None:
    """Every line lands in Layout.shard_of's shard (what every other process computes), once, in the
    window's order, shards ascending."""
    rnd = random.Random(shards)
    targets = {t.target_id: t for t in (BillingTarget(customer=random_id(rnd)) for _ in range(300))}
    buffer = {target_id: rnd.randrange(1, 1 << 40) for target_id in targets}
    layout = Layout("mm", shards)
    grouped = group(buffer, targets, shards)
    assert [shard for shard, _ in grouped] == sorted({layout.shard_of(i) for i in buffer})
    for shard, lines in grouped:
        expected = [(targets[i], units) for i, units in buffer.items() if layout.shard_of(i) == shard]
        assert lines == expected
        assert all(line[0] is targets[line[0].target_id] for line in lines)
    assert group({}, {}, shards) == []


@pytest.mark.parametrize("group", GROUPERS)
def test_grouping_refuses_a_window_it_cannot_place(group: Any) -> None:
    """A target id without its target, or no shards: an error, not a silently smaller window."""
    with pytest.raises(KeyError):
        group({"cus_a||": 1}, {}, 4)
    with pytest.raises(ValueError, match="shards must be positive"):
        group({"cus_a||": 1}, {"cus_a||": BillingTarget(customer="cus_a")}, 0)


def random_lines(rnd: random.Random, count: int) -> list[tuple[BillingTarget, int]]:
    starts = [1_700_000_000 + n * 86_400 for n in range(4)]
    lines: list[tuple[BillingTarget, int]] = []
    for n in range(count):
        start = rnd.choice([*starts, None])
        cls = rnd.choice([BillingTarget, RenamedTarget])
        target = cls(
            customer=f"{random_id(rnd)}{n}",
            meter_event_name=rnd.choice([None, "calls"]),
            period_start=start,
            # some periods without an end (no usage hash), and ends that differ within one period
            period_end=None if start is None or rnd.random() < 0.1 else start + rnd.randrange(1, 40) * 86_400,
        )
        lines.append((target, rnd.choice([1, 2, 999, 1 << 40])))
    return lines


def asking(asked: list[str]) -> Callable[[BillingTarget], str | None]:
    """A metadata decider that records whom it was asked about and answers for some of them."""

    def decide(target: BillingTarget) -> str | None:
        asked.append(target.target_id)
        return None if len(target.target_id) % 3 == 0 else "{}"

    return decide


def test_the_compiled_encoder_writes_the_twins_bytes() -> None:
    """Byte for byte, over random windows: the same period order, expiries, blobs and metadata asked for."""
    if not NATIVE:
        pytest.skip("the compiled module is not built here: nothing to compare the twin with")
    rnd = random.Random(7)
    for _ in range(50):
        lines = random_lines(rnd, rnd.randrange(0, 120))
        # Some entries the very target, some an equal but other object: only the first need nothing.
        sent = {t.target_id: rnd.choice([t, dataclasses.replace(t)]) for t, _ in lines if rnd.random() < 0.5}
        twin_asked: list[str] = []
        compiled_asked: list[str] = []
        twin = py_encode_lines(lines, 3_456_000, sent, asking(twin_asked))
        compiled = _speedups.encode_lines(lines, 3_456_000, sent, asking(compiled_asked))
        assert compiled == twin
        assert compiled_asked == twin_asked


@pytest.mark.parametrize("encode", ENCODERS)
def test_encoded_lines_are_framed_per_period_with_the_latest_expiry(encode: Any) -> None:
    """Lines of one period share its blob and its latest end plus the retention; periodless lines go to
    blob 0; metadata is asked for only where the entry kept for what was sent is not this very target."""
    a = BillingTarget(customer="cus_a", period_start=100, period_end=200)
    b = BillingTarget(customer="cus_b", meter_event_name="calls", period_start=100, period_end=300)
    c = BillingTarget(customer="cus_c", period_start=50, period_end=60)
    d = BillingTarget(customer="cus_d")
    asked: list[str] = []

    def decide(target: BillingTarget) -> str | None:
        asked.append(target.target_id)
        return "{}" if target is not c else None

    sent = {a.target_id: a, c.target_id: BillingTarget("cus_c")}
    encoded = encode([(a, 3), (d, 1), (b, 12), (c, 5)], 1_000, sent, decide)
    starts, expire_at, blobs, meta_args = encoded
    assert starts == [100, 50]
    assert expire_at == [1_300, 1_060]
    assert blobs == [b"cus_d||\t1\n", b"cus_a||\t3\ncus_b||calls\t12\n", b"cus_c||\t5\n"]
    assert asked == ["cus_d||", "cus_b||calls", "cus_c||"]  # a: the very object sent
    assert meta_args == ["cus_d||", "{}", "cus_b||calls", "{}"]
    assert encode([], 1_000, {}, decide) == ([], [], [b""], [])
