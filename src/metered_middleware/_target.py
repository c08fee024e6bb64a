"""What Stripe bills for an API key: the billing target."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ["INACTIVE_STATUSES", "BillingTarget", "parse_target_id"]

# Stripe subscription statuses under which usage must not be admitted (the caller gets a 402).
INACTIVE_STATUSES: Final = frozenset({"canceled", "unpaid", "paused", "incomplete_expired", "expired"})

_SEP: Final = "|"
# One int object per distinct period bound: every target of a period then shares its two ints, so a count
# window's lines read the same two objects instead of two cold ones per target (a tenth of the window's
# encoding with 1,000 keys). Bounded: cleared when full, which only costs the sharing.
_BOUNDS: dict[int, int] = {}
_BOUNDS_MAX: Final = 4096


def _shared_bound(value: int | None) -> int | None:
    if type(value) is not int:  # bools and int subclasses keep their own type
        return value
    shared = _BOUNDS.get(value)
    if shared is None:
        if len(_BOUNDS) >= _BOUNDS_MAX:
            _BOUNDS.clear()
        shared = _BOUNDS[value] = value
    return shared


_FIELDS: Final = (
    "customer",
    "subscription_item",
    "subscription",
    "meter_event_name",
    "status",
    "period_start",
    "period_end",
    "test_clock",
    "key_id",
    "plan",
    "revoked",
)


@dataclass(frozen=True, slots=True)
class BillingTarget:
    """Who pays for a request, and where Stripe records the usage.

    ``subscription_item`` is what legacy usage records are reported on; ``customer`` and
    ``meter_event_name`` are what Billing Meter events carry. The period bounds are Unix seconds;
    ``test_clock`` is set when the subscription runs on a Stripe test clock, whose frozen time then
    stamps the usage.

    ``admissible`` (derived) is whether requests under the target may be served and counted: the key is
    not revoked and the subscription's status is not one of ``INACTIVE_STATUSES``.
    """

    customer: str
    subscription_item: str | None = None
    subscription: str | None = None
    meter_event_name: str | None = None
    status: str = "active"
    period_start: int | None = None
    period_end: int | None = None
    test_clock: str | None = None
    key_id: str | None = None
    plan: str | None = None
    revoked: bool = False
    target_id: str = field(init=False, repr=False, compare=False)
    admissible: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("customer", "subscription_item", "meter_event_name"):
            value = getattr(self, name)
            if value is not None and (_SEP in value or not value.isprintable()):
                # Control characters too: count writes frame target ids with tabs and newlines.
                msg = f"{name} must not contain {_SEP!r} or control characters: {value!r}"
                raise ValueError(msg)
        # The counting key: all a flusher needs to address Stripe, derived once, stable across processes.
        object.__setattr__(
            self,
            "target_id",
            _SEP.join((self.customer, self.subscription_item or "", self.meter_event_name or "")),
        )
        # What the middleware's fast path checks on every request, derived once (the target is frozen).
        object.__setattr__(self, "admissible", not self.revoked and self.active)
        object.__setattr__(self, "period_start", _shared_bound(self.period_start))
        object.__setattr__(self, "period_end", _shared_bound(self.period_end))

    @property
    def active(self) -> bool:
        """Whether usage may be admitted under the subscription's status."""
        return self.status not in INACTIVE_STATUSES

    def to_fields(self) -> dict[str, str]:
        """The target as flat string fields (how the key registry stores it)."""
        out: dict[str, str] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = str(int(value)) if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> BillingTarget:
        """Rebuild a target from ``to_fields()`` output (unknown fields are ignored)."""

        def opt_int(name: str) -> int | None:
            value = fields.get(name)
            return int(value) if value else None

        return cls(
            customer=fields["customer"],
            subscription_item=fields.get("subscription_item") or None,
            subscription=fields.get("subscription") or None,
            meter_event_name=fields.get("meter_event_name") or None,
            status=fields.get("status") or "active",
            period_start=opt_int("period_start"),
            period_end=opt_int("period_end"),
            test_clock=fields.get("test_clock") or None,
            key_id=fields.get("key_id") or None,
            plan=fields.get("plan") or None,
            revoked=fields.get("revoked", "0") not in ("", "0"),
        )


def parse_target_id(target_id: str) -> tuple[str, str | None, str | None]:
    """Split a counting key back into (customer, subscription item, meter event name)."""
    customer, item, event = target_id.split(_SEP, 2)
    return customer, item or None, event or None
