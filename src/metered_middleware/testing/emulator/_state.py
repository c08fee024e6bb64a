"""The emulator's objects, held in plain JSON-ready dicts, and the indexes that keep requests O(1)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

#: What the emulated account answers webhooks in; requests carry their own `Stripe-Version`.
DEFAULT_API_VERSION = "2025-02-24.acacia"
#: The first API version without usage records (2025-03-31.basil); earlier ones still have them.
BASIL = "2025-03-31"
#: Stripe keeps idempotency keys and meter event identifiers for about a day.
DEDUP_HORIZON = 24 * 3600

Obj = dict[str, Any]


def new_id(prefix: str) -> str:
    """A Stripe-looking id (`cus_...`), random so ids never repeat across resets."""
    return f"{prefix}_{secrets.token_hex(12)}"


def is_legacy_version(version: str | None) -> bool:
    """Whether a `Stripe-Version` predates basil, where usage records and `aggregate_usage` live."""
    return version is not None and version[:10] < BASIL


@dataclass(slots=True)
class MeterEvent:
    """One accepted meter event (v1 or v2), indexed by identifier and by (customer, event name)."""

    identifier: str
    event_name: str
    customer: str
    value: Decimal
    timestamp: int
    created: int
    payload: dict[str, str]
    source: str
    canceled: bool = False

    def as_dict(self) -> Obj:
        return {
            "identifier": self.identifier,
            "event_name": self.event_name,
            "customer": self.customer,
            "value": int(self.value) if self.value == int(self.value) else float(self.value),
            "timestamp": self.timestamp,
            "created": self.created,
            "payload": dict(self.payload),
            "source": self.source,
            "canceled": self.canceled,
        }


@dataclass(slots=True)
class RequestRecord:
    """One request as the emulator saw it: what `StripeEmulator.requests()` returns."""

    operation: str
    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    stripe_version: str | None
    status: int = 0
    replayed: bool = False
    fault: str | None = None
    error_code: str | None = None
    # The HTTP library the SDK said it sent with (``httplib`` in ``X-Stripe-Client-User-Agent``).
    http_library: str | None = None


@dataclass
class State:
    """Everything the emulated account holds. Callers hold `lock` around any access."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    clock_offset: int = 0
    customers: dict[str, Obj] = field(default_factory=dict)
    products: dict[str, Obj] = field(default_factory=dict)
    prices: dict[str, Obj] = field(default_factory=dict)
    meters: dict[str, Obj] = field(default_factory=dict)
    subscriptions: dict[str, Obj] = field(default_factory=dict)
    items: dict[str, Obj] = field(default_factory=dict)
    deleted_items: set[str] = field(default_factory=set)
    clocks: dict[str, Obj] = field(default_factory=dict)
    invoices: dict[str, Obj] = field(default_factory=dict)
    checkout_sessions: dict[str, Obj] = field(default_factory=dict)
    #: subscription item -> timestamp -> quantity (legacy usage records)
    usage: dict[str, dict[int, int]] = field(default_factory=dict)
    #: subscription item -> closed periods [(start, end, invoice id)], oldest first
    item_periods: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    events_by_key: dict[tuple[str, str], list[MeterEvent]] = field(default_factory=dict)
    #: identifier -> (event, emulated time it was received), oldest first for pruning
    identifiers: OrderedDict[str, tuple[MeterEvent, int]] = field(default_factory=OrderedDict)
    sessions: dict[str, int] = field(default_factory=dict)
    meter_event_errors: list[Obj] = field(default_factory=list)
    events: list[Obj] = field(default_factory=list)
    log: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=200_000))
    idempotency_conflicts: int = 0
    base_url: str = ""
    on_event: Callable[[Obj, bytes], None] | None = None

    def now(self) -> int:
        """The emulated wall clock: real time plus whatever `advance_clock` added."""
        return int(time.time()) + self.clock_offset

    def customer_now(self, customer_id: str | None) -> int:
        """The time for a customer: its test clock's frozen time when it has one."""
        customer = self.customers.get(customer_id or "")
        clock_id = customer.get("test_clock") if customer else None
        if clock_id and clock_id in self.clocks:
            return int(self.clocks[clock_id]["frozen_time"])
        return self.now()

    def prune_identifiers(self) -> None:
        """Forget meter event identifiers older than the dedup horizon (oldest first, O(1) amortised)."""
        horizon = self.now() - DEDUP_HORIZON
        while self.identifiers:
            _, (_, seen) = next(iter(self.identifiers.items()))
            if seen > horizon:
                break
            self.identifiers.popitem(last=False)

    def add_meter_event(self, event: MeterEvent) -> None:
        self.identifiers[event.identifier] = (event, self.now())
        self.events_by_key.setdefault((event.customer, event.event_name), []).append(event)

    def meter_for_event(self, event_name: str) -> Obj | None:
        """The meter an event name feeds, preferring an active one."""
        found = None
        for meter in self.meters.values():
            if meter["event_name"] == event_name:
                if meter["status"] == "active":
                    return meter
                found = meter
        return found

    def emit(self, event_type: str, obj: Obj, *, request: str | None = None) -> Obj:
        """Record a Stripe event and hand its signed-ready payload to the webhook sender."""
        event: Obj = {
            "id": new_id("evt"),
            "object": "event",
            "api_version": DEFAULT_API_VERSION,
            "created": self.now(),
            "data": {"object": json.loads(json.dumps(obj))},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": request, "idempotency_key": None},
            "type": event_type,
        }
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event, json.dumps(event).encode())
        return event

    def wipe(self) -> None:
        """Forget every object, event and log entry; keeps the lock and the event sink."""
        keep = self.lock, self.on_event, self.base_url
        self.__dict__.update(State().__dict__)
        self.lock, self.on_event, self.base_url = keep
