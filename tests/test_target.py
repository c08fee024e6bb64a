"""BillingTarget: what it derives once, and its period bounds shared between targets of one period."""

from __future__ import annotations

from metered_middleware import BillingTarget
from metered_middleware._target import _BOUNDS_MAX


def test_targets_of_one_period_share_its_bounds_and_keep_their_values() -> None:
    """Two targets rebuilt from stored fields (as the key registry does, each bound parsed anew) hold the
    same two int objects, so a count window's lines read them once; values, equality and the stored fields
    are unchanged."""
    fields = {"customer": "cus_a", "meter_event_name": "calls", "period_start": "1764547200"}
    first = BillingTarget.from_fields({**fields, "period_end": "1767225600"})
    second = BillingTarget.from_fields({**fields, "customer": "cus_b", "period_end": "1767225600"})
    assert first.period_start is second.period_start
    assert first.period_end is second.period_end
    assert (first.period_start, first.period_end) == (1764547200, 1767225600)
    assert BillingTarget.from_fields(first.to_fields()) == first


def test_sharing_bounds_keeps_other_types_and_survives_a_full_table() -> None:
    """Only plain ints are shared: a bool stays a bool even when its equal int was shared first, None stays
    None, and past the table's size the bounds are still right."""
    assert type(BillingTarget(customer="cus_i", period_start=1).period_start) is int
    flagged = BillingTarget(customer="cus_b", period_start=True)
    assert flagged.period_start is True
    assert BillingTarget(customer="cus_n").period_start is None
    for n in range(_BOUNDS_MAX + 10):
        target = BillingTarget(customer="cus_many", period_start=10_000 + n, period_end=20_000 + n)
        assert (target.period_start, target.period_end) == (10_000 + n, 20_000 + n)
