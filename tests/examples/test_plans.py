"""The three plans price usage exactly as Stripe's usage-based billing guide does."""

from __future__ import annotations

from decimal import Decimal

import pytest

from examples.typographic.plans import ENTERPRISE, GROWTH, PLANS, STANDARD, Plan, estimate_cents, plan_by_key


@pytest.mark.parametrize(
    ("plan", "units", "cents"),
    [
        (STANDARD, 0, 1000),
        (STANDARD, 10_000, 1000),
        (STANDARD, 10_001, 1010),
        (STANDARD, 12_345, 24_450),
        (GROWTH, 10_000, 2500),
        (GROWTH, 12_345, 25_950),
        (ENTERPRISE, 10_000, 7500),
        (ENTERPRISE, 12_345, 9259),
    ],
)
def test_bill_follows_the_graduated_tiers(plan: Plan, units: int, cents: int) -> None:
    """The flat fee covers 10,000 requests; each one after costs the second tier's unit amount."""
    assert plan.estimate_cents(units) == cents


def test_fractional_cents_round_once_half_up() -> None:
    """Enterprise's $0.0075 a request is summed exactly and rounded once, half up, as Stripe does."""
    assert ENTERPRISE.estimate_cents(10_001) == 7501  # 7500.75
    assert ENTERPRISE.estimate_cents(10_002) == 7502  # 7501.50
    assert ENTERPRISE.estimate_cents(10_200) == 7650  # 7650.00, not 200 separately rounded cents


def test_tiers_are_sent_to_stripe_as_graduated_decimal_amounts() -> None:
    """The Prices API gets the flat fee, an open-ended last tier and decimal unit amounts."""
    assert [t.to_stripe() for t in ENTERPRISE.tiers] == [
        {"up_to": 10_000, "flat_amount": 7500, "unit_amount_decimal": "0"},
        {"up_to": "inf", "flat_amount": 0, "unit_amount_decimal": "0.75"},
    ]


def test_plans_are_found_by_key_and_have_distinct_lookup_keys() -> None:
    """Keys name plans in metadata; lookup keys make setup-stripe idempotent, so they must differ."""
    assert plan_by_key("growth") is GROWTH
    assert plan_by_key("platinum") is None
    lookup_keys = {p.lookup_key for p in PLANS} | {p.legacy_lookup_key for p in PLANS}
    assert len(lookup_keys) == 2 * len(PLANS)


def test_negative_usage_is_refused() -> None:
    """A negative count is a bug upstream, never a credit."""
    with pytest.raises(ValueError, match="negative"):
        estimate_cents(STANDARD.tiers, -1)
    assert STANDARD.tiers[1].unit_amount_decimal == Decimal(10)
