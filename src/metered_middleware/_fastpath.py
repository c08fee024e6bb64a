"""The request path for cached keys and the count window: the compiled ``_speedups`` where built, else
this module's twins.

Both do the same thing. ``FastPath(scope, send)`` finds the one key on a request, reads the resolver cache's
entry for its fingerprint, admits it and wraps ``send`` so the response is counted, once its status is
known, into the counter's ``Tally`` (its window buffer). Anything unusual (no key, two keys, a miss, an
expired entry, a refusal) comes back as None, and the middleware's general path judges it. The compiled
module exists because, in a busy server, every Python-level operation on this path costs several times its
in-process price (its code and data are cold between requests); see ``benchmarks/README.md``.

The count window's side: ``group_by_shard`` splits a window taken from the ``Tally`` into each shard's
lines, and ``encode_lines`` turns one shard's lines into its count script's arguments. In Python they cost
1-2 us a line, about one line per request in a busy server.

``NATIVE`` says which one runs. ``METERED_PURE_PYTHON=1`` in the environment picks this module's twin even
where the compiled one is built (the tests run both).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, Final

from starlette.types import Message, Scope, Send

from metered_middleware._resolver import CHECK_PREFIX, DictEntries, EntryTable, cache_clock, key_hash
from metered_middleware._target import BillingTarget

__all__ = [
    "NATIVE",
    "FastPath",
    "PyCountingSend",
    "PyFastPath",
    "PyTally",
    "Tally",
    "encode_lines",
    "group_by_shard",
    "new_entries",
    "py_encode_lines",
    "py_find_cached",
    "py_group_by_shard",
]

if TYPE_CHECKING:
    from metered_middleware import _speedups

Entries = EntryTable
Lines = list[tuple[BillingTarget, int]]
Encoded = tuple[list[int], list[int], list[bytes], list[str]]


def py_find_cached(
    headers: list[tuple[bytes, bytes]],
    entries: Entries,
    names: tuple[bytes, ...],
    bearer: bool,
    max_length: int,
) -> BillingTarget | None:
    """The cached target for the request's single key (Bearer or a key header), else None."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            if not bearer or value[:7].lower() != b"bearer ":
                continue
            value = value[7:]
        elif name not in names:
            continue
        if found is not None:
            return None  # two keys: the general path refuses them
        found = value
    # No validation of the bytes here: only keys the general path validated are ever cached, so a hit is
    # a valid key, and anything else (padding, odd bytes) misses and is judged there.
    if found is None or len(found) > max_length:
        return None
    entry = entries.get(key_hash(found))
    if entry is not None and entry[1] == key_hash(CHECK_PREFIX + found) and entry[0] > cache_clock():
        return entry[2]
    return None


class PyTally:
    """The counter's buffer for the window being filled: units per target id, and the latest target object
    per id (it carries the latest period bounds). Past ``max_targets`` ids, units for new ids are dropped,
    counted in ``overflow_units``, and ``overflow()`` is called; while ``armed`` is false, every add calls
    ``wake()`` (the counter starts its writer). ``take()`` hands over both dicts and starts empty ones.
    """

    __slots__ = (
        "_buffer",
        "_max",
        "_overflow",
        "_targets",
        "_wake",
        "armed",
        "counted_requests",
        "counted_units",
        "overflow_units",
    )

    def __init__(self, max_targets: int, wake: Callable[[], object], overflow: Callable[[], object]) -> None:
        self._max = max_targets
        self._wake = wake
        self._overflow = overflow
        self._buffer: dict[str, int] = {}
        self._targets: dict[str, BillingTarget] = {}
        self.armed = False
        self.counted_units = 0
        self.counted_requests = 0
        self.overflow_units = 0

    def add(self, target: BillingTarget, units: int) -> None:
        """Count ``units`` for the target."""
        self.counted_units += units
        self.counted_requests += 1
        buffer = self._buffer
        target_id = target.target_id
        buffered = buffer.get(target_id)
        if buffered is not None or len(buffer) < self._max:
            buffer[target_id] = units if buffered is None else buffered + units
            self._targets[target_id] = target
        else:
            self.overflow_units += units
            self._overflow()
        if not self.armed:
            self._wake()

    def take(self) -> tuple[dict[str, int], dict[str, BillingTarget]]:
        """The window so far (units per target id, target per id); the tally starts empty."""
        taken = self._buffer, self._targets
        self._buffer, self._targets = {}, {}
        return taken

    def take_lines(self, shards: int) -> list[tuple[int, Lines]]:
        """The window so far, grouped by shard as ``group_by_shard`` does; the tally starts empty."""
        return py_group_by_shard(*self.take(), shards)

    def __len__(self) -> int:
        return len(self._buffer)


def py_group_by_shard(
    buffer: dict[str, int], targets: dict[str, BillingTarget], shards: int
) -> list[tuple[int, Lines]]:
    """The window's lines per shard, in shard order, each shard's in the buffer's order.

    ``buffer`` is units per target id and ``targets`` the target per id (``Tally.take``); the shard is
    ``Layout.shard_of``'s CRC-32 of the id.
    """
    if shards <= 0:
        raise ValueError("group_by_shard: shards must be positive")
    by_shard: dict[int, Lines] = {}
    for target_id, units in buffer.items():
        by_shard.setdefault(zlib.crc32(target_id.encode()) % shards, []).append((targets[target_id], units))
    return sorted(by_shard.items())


def py_encode_lines(
    lines: Lines,
    retention: int,
    sent: dict[str, BillingTarget],
    decide: Callable[[BillingTarget], str | None],
) -> Encoded:
    """One count write's script arguments: (period starts, their expiries, line blobs, metadata args).

    A line whose target has both period bounds goes to its period's blob (``blobs[i + 1]`` for
    ``starts[i]``, periods in the order first seen, each expiring at its latest end plus ``retention``);
    the others to ``blobs[0]``. Each line is ``target_id\tunits\n``. A target whose ``sent`` entry is
    the very same object needs no metadata (the caller keeps there only what it sent recently); for any
    other, ``decide(target)`` returns its metadata (appended to the metadata args after its id) or None.
    """
    index_of: dict[int, int] = {}
    starts: list[int] = []
    expire_at: list[int] = []
    groups: list[list[str]] = [[]]
    meta_args: list[str] = []
    for target, units in lines:
        target_id = target.target_id
        start, end = target.period_start, target.period_end
        slot = 0
        if start is not None and end is not None:
            slot = index_of.get(start, 0)
            if not slot:
                starts.append(start)
                expire_at.append(end + retention)
                groups.append([])
                slot = index_of[start] = len(starts)
            elif end + retention > expire_at[slot - 1]:
                expire_at[slot - 1] = end + retention
        groups[slot].append(f"{target_id}\t{units}\n")
        if sent.get(target_id) is not target:
            meta = decide(target)
            if meta is not None:
                meta_args += (target_id, meta)
    return starts, expire_at, ["".join(group).encode() for group in groups], meta_args


class PyCountingSend:
    """``send``, counting ``units`` for the target when the response starts with a counted status."""

    __slots__ = ("_add", "_send", "_statuses", "_target", "_units")

    def __init__(
        self,
        send: Send,
        target: BillingTarget,
        units: int,
        add: Callable[[BillingTarget, int], object],
        statuses: Collection[int],
    ) -> None:
        self._send = send
        self._target = target
        self._units = units
        self._add = add
        self._statuses = statuses

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start" and message["status"] in self._statuses:
            self._add(self._target, self._units)
        return self._send(message)


class PyFastPath:
    """The whole request path for a cached key: ``path(scope, send)`` puts the target in the scope's state
    and returns the ``send`` to give the app (a counting one, or ``send`` itself for a route weighing 0 or
    an excluded path), or None when the general path must judge the request (not HTTP, no key, a miss, a
    refusal, Redis down while closed, a path not yet judged for exclusion)."""

    __slots__ = (
        "_add",
        "_bearer",
        "_closed",
        "_counter",
        "_entries",
        "_excluded",
        "_max",
        "_names",
        "_statuses",
        "_weigh",
    )

    def __init__(
        self,
        *,
        entries: Entries,
        names: tuple[bytes, ...],
        bearer: bool,
        max_length: int,
        add: Callable[[BillingTarget, int], object],
        statuses: Collection[int],
        counter: Any,
        closed: bool,
        weigh: Callable[[Scope], int] | None,
        excluded: dict[str, bool] | None,
    ) -> None:
        self._excluded = excluded
        self._entries = entries
        self._names = names
        self._bearer = bearer
        self._max = max_length
        self._add = add
        self._statuses = statuses
        self._counter = counter
        self._closed = closed
        self._weigh = weigh

    def __call__(self, scope: Scope, send: Send) -> Send | None:
        if scope.get("type") != "http":
            return None  # websockets and lifespan are the general path's
        if self._excluded is not None:
            # Excluded paths pass through unmetered; a path not judged yet goes to the general path, which
            # judges it once and remembers the answer in this dict.
            excluded = self._excluded.get(scope["path"])
            if excluded is None:
                return None
            if excluded:
                return send
        target = py_find_cached(scope["headers"], self._entries, self._names, self._bearer, self._max)
        if target is None or not target.admissible or (self._closed and not self._counter.healthy):
            return None
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["billing_target"] = target
        units = 1 if self._weigh is None else self._weigh(scope)
        if not units:
            return send
        return PyCountingSend(send, target, units, self._add, self._statuses)


def new_entries() -> EntryTable:
    """The resolver cache's entry table: the compiled ``KeyTable`` where built, else a ``DictEntries``."""
    return _speedups.KeyTable() if NATIVE else DictEntries()


NATIVE: bool
FastPath: type[PyFastPath] | type[_speedups.FastPath]
Tally: type[PyTally] | type[_speedups.Tally]
group_by_shard: Callable[[dict[str, int], dict[str, BillingTarget], int], list[tuple[int, Lines]]]
encode_lines: Callable[[Lines, int, dict[str, BillingTarget], Callable[[BillingTarget], str | None]], Encoded]
_PURE: Final = os.environ.get("METERED_PURE_PYTHON", "") not in ("", "0")

try:
    if _PURE or key_hash is not hash:
        # The compiled lookup computes Python's own hash of bytes; a build whose hash is not keyed SipHash
        # (the resolver then uses keyed BLAKE2b) must take the twin.
        raise ImportError("pure Python requested")
    from metered_middleware import _speedups
except ImportError:
    NATIVE = False
    FastPath = PyFastPath
    Tally = PyTally
    group_by_shard = py_group_by_shard
    encode_lines = py_encode_lines
else:
    NATIVE = True
    _speedups.bind_target(BillingTarget)
    FastPath = _speedups.FastPath
    Tally = _speedups.Tally
    group_by_shard = _speedups.group_by_shard
    encode_lines = _speedups.encode_lines
