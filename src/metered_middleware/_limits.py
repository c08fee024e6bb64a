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
    """One lock per key, created on demand and dropped when unused (keys are customers × meters)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Hold every key's lock; acquired in sorted order so two holders never deadlock."""
        registered: list[str] = []
        acquired: list[str] = []
        try:
            for key in sorted(set(keys)):
                lock, users = self._locks.get(key) or (anyio.Lock(), 0)
                self._locks[key] = (lock, users + 1)
                registered.append(key)
                await lock.acquire()
                acquired.append(key)
            yield
        finally:
            for key in reversed(registered):
                lock, users = self._locks[key]
                if key in acquired:
                    lock.release()
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Jittered exponential backoff ("equal jitter"), never shorter than Stripe's ``Retry-After``."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    delay: float = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay
