"""The three plans, exactly as Stripe's usage-based billing guide prices them, and the bill they make.

Each plan is a monthly graduated tiered price in US cents: a flat fee covers the first 10,000 requests,
and every request after that costs the second tier's unit amount. Enterprise's $0.0075 is not a whole
cent, so it is given as ``unit_amount_decimal`` and Stripe rounds the line once, half up, to the cent.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

__all__ = [
    "ENTERPRISE",
    "GROWTH",
    "METER_EVENT_NAME",
    "PLANS",
    "STANDARD",
    "Plan",
    "Tier",
    "estimate_cents",
    "plan_by_key",
]

METER_EVENT_NAME: Final = "typographic_requests"
INCLUDED_REQUESTS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Tier:
    """A graduated tier: ``flat_amount`` once usage reaches it, plus ``unit_amount_decimal`` per unit in it.

    ``up_to`` is the last unit of the tier, or None for the open-ended last tier. Amounts are in cents.
    """

    up_to: int | None
    flat_amount: int
    unit_amount_decimal: Decimal

    def to_stripe(self) -> dict[str, str | int]:
        """The tier as Stripe's Prices API takes it."""
        return {
            "up_to": "inf" if self.up_to is None else self.up_to,
            "flat_amount": self.flat_amount,
            "unit_amount_decimal": str(self.unit_amount_decimal),
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """A product with one monthly graduated price."""

    key: str
    name: str
    description: str
    tiers: tuple[Tier, ...]

    @property
    def lookup_key(self) -> str:
        """The lookup key of the price billed through a Billing Meter (meter event sinks)."""
        return f"typographic_{self.key}_monthly"

    @property
    def legacy_lookup_key(self) -> str:
        """The lookup key of the legacy metered price billed through usage records."""
        return f"typographic_{self.key}_monthly_legacy"

    @property
    def base_cents(self) -> int:
        """The monthly fee that covers the included requests."""
        return self.tiers[0].flat_amount

    def estimate_cents(self, units: int) -> int:
        """The bill for ``units`` requests in a period, as Stripe computes it (see ``estimate_cents``)."""
        return estimate_cents(self.tiers, units)


def _tiers(base_cents: int, overage_cents: str) -> tuple[Tier, ...]:
    return (
        Tier(up_to=INCLUDED_REQUESTS, flat_amount=base_cents, unit_amount_decimal=Decimal(0)),
        Tier(up_to=None, flat_amount=0, unit_amount_decimal=Decimal(overage_cents)),
    )


STANDARD: Final = Plan(
    "standard", "Standard", "$10 for the first 10,000 requests, then $0.10 each", _tiers(1000, "10")
)
GROWTH: Final = Plan(
    "growth", "Growth", "$25 for the first 10,000 requests, then $0.10 each", _tiers(2500, "10")
)
ENTERPRISE: Final = Plan(
    "enterprise", "Enterprise", "$75 for the first 10,000 requests, then $0.0075 each", _tiers(7500, "0.75")
)
PLANS: Final = (STANDARD, GROWTH, ENTERPRISE)


def plan_by_key(key: str | None) -> Plan | None:
    """The plan with this key (``standard``, ``growth``, ``enterprise``), or None."""
    return next((p for p in PLANS if p.key == key), None)


def estimate_cents(tiers: tuple[Tier, ...], units: int) -> int:
    """Integer cents for ``units`` under graduated tiers.

    Each tier charges its units at its rate, plus its flat amount once usage reaches it (the first tier's
    flat amount always applies: it is the plan's fee). The exact sum is rounded once, half up, as Stripe
    rounds a line whose price uses ``unit_amount_decimal``.
    """
    if units < 0:
        msg = f"units must not be negative: {units}"
        raise ValueError(msg)
    total = Decimal(0)
    lower = 0
    for index, tier in enumerate(tiers):
        upper = tier.up_to
        in_tier = max(0, (units if upper is None else min(units, upper)) - lower)
        if in_tier > 0 or index == 0:
            total += tier.flat_amount + tier.unit_amount_decimal * in_tier
        if upper is None or units <= upper:
            break
        lower = upper
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))
