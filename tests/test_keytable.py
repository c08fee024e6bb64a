"""The resolver cache's entry table, and the open window's units kept in its slots.

``KeyTable`` (compiled) must behave as ``DictEntries`` (the twin) does for everything the resolver asks of
it, and the units a compiled fast path counts into its slots must reach the counter's window exactly once,
whatever happens to the entries in between: replaced by a refreshed target, evicted, removed, the table
cleared or grown.
"""

from __future__ import annotations

import gc
import random
import sys
from typing import Any

import pytest

from metered_middleware import BillingTarget
from metered_middleware._fastpath import NATIVE, PyFastPath, PyTally, encode_lines, py_encode_lines
from metered_middleware._layout import Layout
from metered_middleware._resolver import DictEntries, cache_clock, fingerprint
from metered_middleware._store import target_metadata
from tests.test_fastpath import ignore, scope_with, tally_path

TABLES: list[Any] = [pytest.param(DictEntries, id="python")]
if NATIVE:
    from metered_middleware import _speedups

    TABLES.append(pytest.param(_speedups.KeyTable, id="native"))

native_only = pytest.mark.skipif(not NATIVE, reason="the compiled request path is not built here")


@pytest.mark.parametrize("make", TABLES)
def test_the_table_behaves_as_an_insertion_ordered_dict(make: Any) -> None:
    """Random sets, replacements, removals and evictions, checked against a dict after every step: the
    same answers, the same length, and the same oldest-first order (a replaced entry keeps its place)."""
    rnd = random.Random(6)
    table = make()
    model: dict[int, tuple[float, int, BillingTarget | None]] = {}
    targets = [BillingTarget(customer=f"cus_{n}") for n in range(5)] + [None]
    firsts = [rnd.getrandbits(64) - 2**63 for _ in range(300)] + [0, -1, 2**63 - 1, -(2**63)]
    for step in range(20_000):
        first = rnd.choice(firsts)
        op = rnd.random()
        if op < 0.45:
            entry = (rnd.random() * 100, rnd.getrandbits(63), rnd.choice(targets))
            table[first] = entry
            model[first] = entry
        elif op < 0.65:
            assert table.pop(first, None) == model.pop(first, None)
        elif op < 0.7 and model:
            oldest = next(iter(model))
            assert table.popoldest() == (oldest, model.pop(oldest))
        elif op < 0.7005:
            table.clear()
            model.clear()
        else:
            assert table.get(first) == model.get(first)
            assert (first in table) is (first in model)
        assert len(table) == len(model)
        if step % 1000 == 0:
            assert list(table.items()) == list(model.items())
    assert list(table.items()) == list(model.items())


@native_only
def test_the_compiled_table_refuses_what_a_cache_entry_cannot_be() -> None:
    """Keys are 64-bit ints and values (float, int, target): anything else is a clear error, not a crash."""
    table = _speedups.KeyTable()
    with pytest.raises(TypeError):
        table["k"] = (1.0, 2, None)  # type: ignore[index]
    with pytest.raises(OverflowError):
        table[2**64] = (1.0, 2, None)
    with pytest.raises(TypeError):
        table[1] = (1, 2, None)
    with pytest.raises(TypeError):
        table[1] = (1.0, 2)  # type: ignore[assignment]
    with pytest.raises(KeyError):
        del table[1]
    with pytest.raises(KeyError):
        table.popoldest()
    assert table.get("k") is None  # type: ignore[arg-type]
    assert "k" not in table
    assert len(table) == 0


# -- the window's units in the slots -------------------------------------------------------------------
IMPLEMENTATIONS: list[Any] = [pytest.param((PyFastPath, DictEntries, PyTally), id="python")]
if NATIVE:
    IMPLEMENTATIONS.append(
        pytest.param((_speedups.FastPath, _speedups.KeyTable, _speedups.Tally), id="native")
    )


@pytest.mark.anyio
@pytest.mark.parametrize("taking", ["take", "take_lines"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
async def test_every_counted_unit_reaches_a_window_once_whatever_happens_to_its_entry(
    implementation: Any, taking: str
) -> None:
    """Requests for 40 keys of 25 customers, counted while their entries are refreshed with new target
    objects (a new period), moved to other customers, evicted, removed, cleared and grown past the table's
    size, and windows taken in between. Every counted unit is in exactly one window, under the id of the
    target its request was admitted with; a response that starts after its entry changed counts too.
    Windows are taken as the two dicts (``take``) or as each shard's lines (``take_lines``, what the
    counter uses where compiled), and each line is in its target id's shard."""
    make_path, make_table, make_tally = implementation
    layout = Layout(shards=4)
    rnd = random.Random(8)
    table = make_table()
    tally = make_tally(100_000, lambda: None, lambda: None)
    path = tally_path(make_path, table, tally)
    keys = [f"mm_live_{n:032d}".encode() for n in range(40)]

    def target_for(n: int, period: int) -> BillingTarget:
        return BillingTarget(customer=f"cus_{n % 25}", meter_event_name="calls", period_start=period)

    def store(key: bytes, target: BillingTarget) -> None:
        first, second = fingerprint(key)
        table[first] = (cache_clock() + 60, second, target)

    for n, key in enumerate(keys):
        store(key, target_for(n, 0))
    expected: dict[str, int] = {}
    windows: dict[str, int] = {}
    in_flight: list[tuple[Any, BillingTarget]] = []

    def take() -> None:
        if taking == "take_lines":
            for shard, lines in tally.take_lines(layout.shards):
                assert lines
                for target, count in lines:
                    assert layout.shard_of(target.target_id) == shard
                    windows[target.target_id] = windows.get(target.target_id, 0) + count
            return
        units, kept = tally.take()
        assert set(units) == set(kept)
        for target_id, count in units.items():
            assert kept[target_id].target_id == target_id
            windows[target_id] = windows.get(target_id, 0) + count

    for step in range(6_000):
        op = rnd.random()
        n = rnd.randrange(len(keys))
        key = keys[n]
        if op < 0.6:
            scope = scope_with(key)
            send = path(scope, ignore)
            if send is not None:
                in_flight.append((send, scope["state"]["billing_target"]))
        elif op < 0.85 and in_flight:
            send, target = in_flight.pop(rnd.randrange(len(in_flight)))
            await send({"type": "http.response.start", "status": 200})
            expected[target.target_id] = expected.get(target.target_id, 0) + 1
        elif op < 0.9:
            store(key, target_for(n + rnd.randrange(2) * 7, step))  # refreshed, maybe another customer
        elif op < 0.93:
            table.pop(fingerprint(key)[0], None)
        elif op < 0.94 and len(table):
            table.popoldest()
        elif op < 0.942:
            table.clear()
        elif op < 0.95:
            for extra in range(rnd.randrange(1, 200)):  # strangers' keys grow the table (it resizes)
                store(b"guess_%d_%d" % (step, extra), target_for(extra, step))
        elif op < 0.98:
            take()
        else:
            for m, again in enumerate(keys):
                if fingerprint(again)[0] not in table:
                    store(again, target_for(m, step))
    for send, target in in_flight:
        await send({"type": "http.response.start", "status": 200})
        expected[target.target_id] = expected.get(target.target_id, 0) + 1
    take()
    assert windows == expected
    assert tally.counted_units == sum(expected.values()) == tally.counted_requests
    assert len(tally) == 0
    assert tally.take() == ({}, {})
    assert tally.take_lines(layout.shards) == []


@native_only
@pytest.mark.anyio
async def test_a_window_taken_as_lines_holds_the_dicts_and_the_slots_each_with_its_own_target() -> None:
    """A key counted through the dicts (its first request, on the general path) and then through its
    slot, after the cache refreshed it into a new period: one line each, with the target each was
    admitted under, both in the id's shard, and the next window empty."""
    layout = Layout(shards=4)
    table = _speedups.KeyTable()
    tally = _speedups.Tally(100, lambda: None, lambda: None)
    path = tally_path(_speedups.FastPath, table, tally)
    key = b"mm_live_lines_key_00000000000000000"
    old = BillingTarget(customer="cus_lines", meter_event_name="calls", period_start=100, period_end=200)
    new = BillingTarget(customer="cus_lines", meter_event_name="calls", period_start=200, period_end=300)
    tally.add(old, 2)
    hashes = fingerprint(key)
    table[hashes[0]] = (cache_clock() + 60, hashes[1], new)
    for _ in range(3):
        await path(scope_with(key), ignore)({"type": "http.response.start", "status": 200})
    shard = layout.shard_of(old.target_id)
    [(taken_shard, lines)] = tally.take_lines(layout.shards)
    assert taken_shard == shard
    assert [(target.period_start, units) for target, units in lines] == [(100, 2), (200, 3)]
    assert len(tally) == 0
    assert tally.take_lines(layout.shards) == []
    assert tally.counted_units == 5


@native_only
@pytest.mark.anyio
async def test_a_subclass_target_is_counted_through_the_dicts_and_taken_in_its_shard() -> None:
    """A resolver may return a subclass of BillingTarget. Its entry's slot does not take units (its fields
    are not read at fixed offsets), so its requests count through the tally's dicts, and their lines are
    taken in their ids' shards like any others."""

    class Tagged(BillingTarget):
        pass

    layout = Layout(shards=8)
    table = _speedups.KeyTable()
    tally = _speedups.Tally(100, lambda: None, lambda: None)
    path = tally_path(_speedups.FastPath, table, tally)
    targets = [Tagged(customer=f"cus_sub_{n}", meter_event_name="calls") for n in range(20)]
    keys = [b"mm_live_sub_%027d" % n for n in range(20)]
    for key, target in zip(keys, targets, strict=True):
        hashes = fingerprint(key)
        table[hashes[0]] = (cache_clock() + 60, hashes[1], target)
        await path(scope_with(key), ignore)({"type": "http.response.start", "status": 200})
    taken = tally.take_lines(layout.shards)
    lines = sorted(
        ((shard, target.customer, units) for shard, shard_lines in taken for target, units in shard_lines),
        key=lambda line: line[1],
    )
    expected = sorted(
        ((layout.shard_of(t.target_id), t.customer, 1) for t in targets), key=lambda line: line[1]
    )
    assert lines == expected
    assert all(type(target) is Tagged for _, shard_lines in taken for target, _ in shard_lines)


@native_only
@pytest.mark.anyio
async def test_taking_lines_refuses_a_slot_whose_target_id_is_not_text_and_keeps_the_window() -> None:
    """A target whose id was replaced by something that is not a str (no BillingTarget has one) is a clear
    error when the window is taken, and every unit stays in the window until the id is text again."""
    layout = Layout(shards=4)
    table = _speedups.KeyTable()
    tally = _speedups.Tally(100, lambda: None, lambda: None)
    path = tally_path(_speedups.FastPath, table, tally)
    target = BillingTarget(customer="cus_odd", meter_event_name="calls")
    good_id = target.target_id
    object.__setattr__(target, "target_id", 42)  # before it is stored: its slot cannot work out its shard
    key = b"mm_live_odd_id_00000000000000000000"
    hashes = fingerprint(key)
    table[hashes[0]] = (cache_clock() + 60, hashes[1], target)
    for _ in range(3):
        await path(scope_with(key), ignore)({"type": "http.response.start", "status": 200})
    tally.add(BillingTarget(customer="cus_fine", meter_event_name="calls"), 2)
    with pytest.raises(TypeError, match="target_id must be str"):
        tally.take_lines(layout.shards)
    assert len(tally) == 2
    object.__setattr__(target, "target_id", good_id)
    taken = {t.customer: units for _, lines in tally.take_lines(layout.shards) for t, units in lines}
    assert taken == {"cus_odd": 3, "cus_fine": 2}
    assert len(tally) == 0


@native_only
@pytest.mark.anyio
async def test_taking_lines_refuses_a_bad_shard_count_and_keeps_the_window() -> None:
    """A shard count below one is a clear error, and the window is still there to be taken."""
    table = _speedups.KeyTable()
    tally = _speedups.Tally(100, lambda: None, lambda: None)
    path = tally_path(_speedups.FastPath, table, tally)
    key = b"mm_live_bad_shards_0000000000000000"
    target = BillingTarget(customer="cus_bad", meter_event_name="calls")
    hashes = fingerprint(key)
    table[hashes[0]] = (cache_clock() + 60, hashes[1], target)
    await path(scope_with(key), ignore)({"type": "http.response.start", "status": 200})
    tally.add(BillingTarget(customer="cus_dict"), 4)
    for shards in (0, -1):
        with pytest.raises(ValueError, match="shards must be positive"):
            tally.take_lines(shards)
    with pytest.raises(TypeError):
        tally.take_lines("4")  # type: ignore[arg-type]
    assert len(tally) == 2
    taken = {target.customer: units for _, lines in tally.take_lines(1) for target, units in lines}
    assert taken == {"cus_bad": 1, "cus_dict": 4}


@native_only
@pytest.mark.anyio
async def test_a_second_middleware_on_the_same_cache_counts_in_its_own_window() -> None:
    """Two fast paths sharing one resolver cache: the first counts in the slots, the second in its own
    tally's dicts, and neither window holds the other's units."""
    table = _speedups.KeyTable()
    first_tally = _speedups.Tally(10, lambda: None, lambda: None)
    second_tally = _speedups.Tally(10, lambda: None, lambda: None)
    key = b"mm_live_shared_key_0000000000000000"
    target = BillingTarget(customer="cus_1", meter_event_name="calls")
    hashes = fingerprint(key)
    table[hashes[0]] = (cache_clock() + 60, hashes[1], target)
    first = tally_path(_speedups.FastPath, table, first_tally)
    second = tally_path(_speedups.FastPath, table, second_tally)
    for path, times in ((first, 3), (second, 2)):
        for _ in range(times):
            await path(scope_with(key), ignore)({"type": "http.response.start", "status": 200})
    assert len(first_tally) == 1
    assert len(second_tally) == 1
    assert first_tally.take()[0] == {target.target_id: 3}
    assert second_tally.take()[0] == {target.target_id: 2}


@native_only
def test_a_cache_and_its_window_are_collected_together() -> None:
    """The table and the tally it counts for refer to each other; the garbage collector frees both (and
    with them the targets the table holds)."""
    target = BillingTarget(customer="cus_gc")
    baseline = sys.getrefcount(target)
    table = _speedups.KeyTable()
    tally = _speedups.Tally(10, lambda: None, lambda: None)
    hashes = fingerprint(b"k")
    table[hashes[0]] = (cache_clock() + 60, hashes[1], target)
    path = tally_path(_speedups.FastPath, table, tally)  # binds the table to the tally
    assert sys.getrefcount(target) == baseline + 1
    del table, tally, path
    gc.collect()
    assert sys.getrefcount(target) == baseline


@pytest.mark.anyio
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
async def test_requests_and_windows_leave_no_reference_behind(implementation: Any) -> None:
    """A thousand requests over ten keys (counted, refused with a 500, and a miss), each key's entry
    refreshed with a new target halfway, windows taken as lines and encoded: afterwards every object the
    path was handed (targets, the scope's parts, the server's send, the statuses) is referred to exactly
    as often as before. A reference kept per request is memory a server never gets back."""
    make_path, make_table, make_tally = implementation
    layout = Layout(shards=4)
    table = make_table()
    tally = make_tally(100, lambda: None, lambda: None)
    path = tally_path(make_path, table, tally)
    keys = [f"mm_live_refs_{n:02d}_0000000000000000000".encode() for n in range(10)]
    olds = [BillingTarget(customer=f"cus_refs_{n}", period_start=100, period_end=200) for n in range(10)]
    news = [BillingTarget(customer=f"cus_refs_{n}", period_start=200, period_end=300) for n in range(10)]
    headers = [[(b"x-api-key", key)] for key in keys]
    started = {"type": "http.response.start", "status": 200}
    failed = {"type": "http.response.start", "status": 500}
    body = {"type": "http.response.body"}
    watched: list[object] = [*olds, *news, *keys, *headers, ignore, started, failed, body]
    before = [sys.getrefcount(o) for o in watched]
    for key, target in zip(keys, olds, strict=True):
        hashes = fingerprint(key)
        table[hashes[0]] = (cache_clock() + 60, hashes[1], target)

    taken = 0
    for n in range(1000):
        if n == 500:
            taken += sum(units for _, lines in tally.take_lines(layout.shards) for _, units in lines)
            for key, target in zip(keys, news, strict=True):  # the cache refreshes every key
                hashes = fingerprint(key)
                table[hashes[0]] = (cache_clock() + 60, hashes[1], target)
        scope = {"type": "http", "method": "GET", "path": "/v1/x", "headers": headers[n % 10]}
        send = path(scope, ignore)
        assert send is not None
        await send(failed if n % 7 == 0 else started)
        await send(body)
        assert path({"type": "http", "headers": [(b"x-api-key", b"mm_live_not_cached")]}, ignore) is None
        del scope, send
    windows = tally.take_lines(layout.shards)
    taken += sum(units for _, lines in windows for _, units in lines)
    encode = py_encode_lines if make_path is PyFastPath else encode_lines
    for _, lines in windows:
        encode(lines, 3600, {}, target_metadata)
    del windows, lines
    assert taken == sum(1 for n in range(1000) if n % 7)

    for key in keys:  # the cache lets go of its targets
        del table[fingerprint(key)[0]]
    del key, target, hashes  # the loops' last values
    gc.collect()
    assert [sys.getrefcount(o) for o in watched] == before
