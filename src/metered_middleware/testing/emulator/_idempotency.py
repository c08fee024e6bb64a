"""Idempotency keys: the first response is stored and replayed; other parameters are a conflict."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ._state import DEDUP_HORIZON


def fingerprint(method: str, path: str, params: dict[str, Any]) -> str:
    """What "the same request" means: method, path and parameters, order-insensitive."""
    canonical = json.dumps([method, path, params], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Stored:
    fingerprint: str
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    request_id: str
    stored_at: int


class IdempotencyStore:
    """Keys kept for Stripe's 24 hours of emulated time; expired ones pruned oldest first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def lookup(self, key: str, now: int) -> Stored | None:
        horizon = now - DEDUP_HORIZON
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.stored_at > horizon:
                break
            self._entries.popitem(last=False)
        return self._entries.get(key)

    def store(self, key: str, entry: Stored) -> None:
        self._entries[key] = entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
