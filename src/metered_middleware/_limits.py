"""Client-side limits that keep the flusher inside Stripe's budgets by construction (DESIGN invariant 7)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import anyio

__all__ = ["KeyedLocks", "TokenBucket", "backoff_delay"]


class TokenBucket:
    """``rate`` requests per second on average, bursts up to ``burst``; waiters served in order."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._updated: float | None = None
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        """Wait until a request may start."""
        async with self._lock:
            while True:
                now = anyio.current_time()
                if self._updated is not None:
                    self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await anyio.sleep((1 - self._tokens) / self.rate)


class KeyedLocks:
    """One lock per key, held only while in use (keys are customers × meters).

    A free key costs a dict insert and delete: no lock object and no pass through the event loop. A v2 stream
    request holds 100 keys, and an ``anyio.Lock`` for each (created, then acquired with a yield) was about a
    fifth of the flusher's CPU per line. Holders of a taken key wait for its release, then look again.
    """

    def __init__(self) -> None:
        self._held: dict[str, list[anyio.Event]] = {}

    @asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Hold every key; taken in sorted order so that two holders never deadlock."""
        taken: list[str] = []
        try:
            for key in sorted(set(keys)):
                while (waiters := self._held.get(key)) is not None:
                    released = anyio.Event()
                    waiters.append(released)
                    await released.wait()
                # No await between the look and the take: no other task can take the key in between.
                self._held[key] = []
                taken.append(key)
            yield
        finally:
            for key in taken:
                for released in self._held.pop(key):
                    released.set()

    def __len__(self) -> int:
        """Keys held now."""
        return len(self._held)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Jittered exponential backoff ("equal jitter"), never shorter than Stripe's ``Retry-After``."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    delay: float = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay
