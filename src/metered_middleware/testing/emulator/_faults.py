"""Faults on demand (errors, timeouts, lost responses), added latency, and the rate limiter."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

#: Every kind `StripeEmulator.inject` takes.
FAULT_KINDS = frozenset({"429", "500", "503", "timeout", "commit_then_500", "commit_then_drop"})
ANY = "*"


@dataclass(frozen=True, slots=True)
class Fault:
    """One queued failure; `delay` bounds how long a `timeout` holds the request."""

    kind: str
    delay: float | None = None

    @property
    def commits(self) -> bool:
        """Whether the write is applied before the client loses the answer."""
        return self.kind.startswith("commit_then_")


class Faults:
    """Per-operation queues of the next calls to fail, and per-operation latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}
        self._latency: dict[str, float] = {}

    def inject(self, operation: str, kind: str, times: int = 1, delay: float | None = None) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        with self._lock:
            self._queues.setdefault(operation, deque()).extend([Fault(kind, delay)] * times)

    def take(self, operation: str) -> Fault | None:
        """The fault for this call, if any: the operation's own queue first, then `"*"`."""
        with self._lock:
            for name in (operation, ANY):
                queue = self._queues.get(name)
                if queue:
                    return queue.popleft()
        return None

    def pending(self, operation: str) -> int:
        with self._lock:
            return len(self._queues.get(operation, ()))

    def set_latency(self, operation: str, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"latency must not be negative, got {seconds}")
        with self._lock:
            self._latency[operation] = seconds

    def latency(self, operation: str) -> float:
        with self._lock:
            return self._latency.get(operation, 0.0) + self._latency.get(ANY, 0.0)

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()
            self._latency.clear()


class TokenBucket:
    """Stripe-style rate limiting: `rate` requests a second, bursts up to one second's worth."""

    def __init__(self, rate: float | None) -> None:
        self._lock = threading.Lock()
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate limit must be positive or None (off), got {rate}")
        with self._lock:
            self._rate = rate
            self._capacity = max(rate or 0.0, 1.0)
            self._tokens = self._capacity
            self._last = time.monotonic()

    def allow(self) -> bool:
        with self._lock:
            if self._rate is None:
                return True
            now = time.monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False
