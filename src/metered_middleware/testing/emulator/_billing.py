"""Billing arithmetic: billing periods, tiered prices, usage aggregation, invoices and rollover."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from ._state import MeterEvent, Obj, State, new_id

_DAY = 86400


def period_boundary(anchor: int, interval: str, count: int, n: int) -> int:
    """The n-th period boundary after `anchor`; months keep the anchor's day, clamped to month end."""
    if interval in ("day", "week"):
        return anchor + n * count * _DAY * (7 if interval == "week" else 1)
    start = datetime.fromtimestamp(anchor, UTC)
    months = n * count * (12 if interval == "year" else 1)
    year, month0 = divmod(start.month - 1 + months, 12)
    year += start.year
    day = min(start.day, calendar.monthrange(year, month0 + 1)[1])
    moved = start.replace(year=year, month=month0 + 1, day=day)
    return int((moved - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(seconds=1))


def _dec(value: Any) -> Decimal:
    return Decimal(str(value)) if value is not None else Decimal(0)


def _unit(tier_or_price: Obj) -> Decimal:
    if tier_or_price.get("unit_amount_decimal") is not None:
        return _dec(tier_or_price["unit_amount_decimal"])
    return _dec(tier_or_price.get("unit_amount"))


def _flat(tier: Obj) -> Decimal:
    if tier.get("flat_amount_decimal") is not None:
        return _dec(tier["flat_amount_decimal"])
    return _dec(tier.get("flat_amount"))


def price_amount(price: Obj, quantity: int) -> int:
    """The amount in the currency's minor unit for `quantity` of a price, rounded once, half up.

    Graduated tiers charge each tier's units at its rate plus its flat amount once usage reaches
    it (the first tier's flat amount always applies); volume tiers charge every unit at the rate
    of the tier the total falls in.
    """
    if price.get("billing_scheme") != "tiered":
        total = _unit(price) * quantity
    else:
        tiers: list[Obj] = price["tiers"]
        total = Decimal(0)
        if price.get("tiers_mode") == "volume":
            for tier in tiers:
                if tier["up_to"] is None or quantity <= tier["up_to"]:
                    total = _flat(tier) + _unit(tier) * quantity
                    break
        else:
            lower = 0
            for index, tier in enumerate(tiers):
                upper = tier["up_to"]
                in_tier = max(0, (quantity if upper is None else min(quantity, upper)) - lower)
                if in_tier > 0 or index == 0:
                    total += _flat(tier) + _unit(tier) * in_tier
                if upper is None or quantity <= upper:
                    break
                lower = upper
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def is_metered(price: Obj) -> bool:
    recurring = price.get("recurring") or {}
    return recurring.get("usage_type") == "metered"


def meter_value(state: State, customer: str, meter: Obj, start: int, end: int) -> Decimal:
    """A meter's aggregate for a customer over [start, end), by its formula (sum, count or last)."""
    events = state.events_by_key.get((customer, meter["event_name"]), [])
    formula = meter["default_aggregation"]["formula"]
    total = Decimal(0)
    latest: MeterEvent | None = None
    for event in events:
        if event.canceled or not start <= event.timestamp < end:
            continue
        if formula == "count":
            total += 1
        elif formula == "last":
            if latest is None or event.timestamp >= latest.timestamp:
                latest = event
        else:
            total += event.value
    if formula == "last":
        return latest.value if latest is not None else Decimal(0)
    return total


def usage_quantity(state: State, item: Obj, start: int, end: int) -> int:
    """Metered quantity of a subscription item over [start, end): meter events or usage records."""
    price = item["price"]
    recurring = price["recurring"]
    if recurring.get("meter"):
        meter = state.meters.get(recurring["meter"])
        if meter is None:
            return 0
        sub = state.subscriptions[item["subscription"]]
        value = meter_value(state, sub["customer"], meter, start, end)
        return int(value.to_integral_value(rounding=ROUND_HALF_UP))
    records = state.usage.get(item["id"], {})
    mode = recurring.get("aggregate_usage") or "sum"
    if mode == "last_ever":
        past = [ts for ts in records if ts < end]
        return records[max(past)] if past else 0
    window = sorted((ts, q) for ts, q in records.items() if start <= ts < end)
    if mode == "last_during_period":
        return window[-1][1] if window else 0
    if mode == "max":
        return max((q for _, q in window), default=0)
    return sum(q for _, q in window)


def _line(item: Obj, amount: int, quantity: int, start: int, end: int) -> Obj:
    price = item["price"]
    return {
        "id": new_id("il"),
        "object": "line_item",
        "amount": amount,
        "currency": price["currency"],
        "description": f"{quantity} × {price.get('nickname') or price['id']}",
        "livemode": False,
        "metadata": {},
        "period": {"start": start, "end": end},
        "pricing": {
            "type": "price_details",
            "price_details": {"price": price["id"], "product": price["product"]},
            "unit_amount_decimal": price.get("unit_amount_decimal"),
        },
        "quantity": quantity,
        "subscription": item["subscription"],
        "subscription_item": item["id"],
    }


def build_invoice(state: State, sub: Obj, start: int, end: int, next_end: int | None, reason: str) -> Obj:
    """An invoice for a subscription: metered usage over [start, end) in arrears and licensed
    quantities for the following period [end, next_end) in advance, as Stripe bills them."""
    lines: list[Obj] = []
    for item in live_items(state, sub):
        price = item["price"]
        if is_metered(price):
            if reason == "subscription_create":
                continue
            quantity = usage_quantity(state, item, start, end)
            lines.append(_line(item, price_amount(price, quantity), quantity, start, end))
        elif next_end is not None:
            quantity = int(item.get("quantity") or 1)
            lines.append(_line(item, price_amount(price, quantity), quantity, end, next_end))
    total = sum(line["amount"] for line in lines)
    currency = lines[0]["currency"] if lines else "usd"
    return {
        "id": new_id("in"),
        "object": "invoice",
        "amount_due": total,
        "amount_paid": 0,
        "amount_remaining": total,
        "billing_reason": reason,
        "collection_method": "charge_automatically",
        "created": state.customer_now(sub["customer"]),
        "currency": currency,
        "customer": sub["customer"],
        "lines": {
            "object": "list",
            "data": lines,
            "has_more": False,
            "total_count": len(lines),
            "url": "/v1/invoices/lines",
        },
        "livemode": False,
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub["id"], "metadata": {}},
        },
        "period_start": start,
        "period_end": end,
        "status": "draft",
        "subscription": sub["id"],
        "subtotal": total,
        "test_clock": sub.get("test_clock"),
        "total": total,
    }


def live_items(state: State, sub: Obj) -> list[Obj]:
    return [state.items[i] for i in sub["_item_ids"] if i in state.items]


def finalize(state: State, invoice: Obj, now: int) -> Obj:
    invoice["status"] = "open" if invoice["amount_due"] > 0 else "paid"
    invoice["status_transitions"] = {"finalized_at": now}
    state.invoices[invoice["id"]] = invoice
    state.emit("invoice.created", invoice)
    state.emit("invoice.finalized", invoice)
    return invoice


def set_period(state: State, sub: Obj, start: int, end: int) -> None:
    """Stripe has moved periods from subscriptions to items; keep both in step."""
    sub["current_period_start"], sub["current_period_end"] = start, end
    for item in live_items(state, sub):
        item["current_period_start"], item["current_period_end"] = start, end


def roll(state: State, sub: Obj) -> None:
    """Close every period that ended by the customer's time, finalizing one invoice for each."""
    now = state.customer_now(sub["customer"])
    changed = False
    while sub["status"] in ("active", "trialing", "past_due") and now >= sub["current_period_end"]:
        start, end = sub["current_period_start"], sub["current_period_end"]
        if sub.get("cancel_at_period_end"):
            invoice = finalize(state, build_invoice(state, sub, start, end, None, "subscription_cycle"), end)
            close_periods(state, sub, start, end, invoice["id"])
            end_subscription(state, sub, end)
            return
        sub["_periods"] += 1
        interval, count = sub["_interval"]
        next_end = period_boundary(sub["billing_cycle_anchor"], interval, count, sub["_periods"] + 1)
        invoice = build_invoice(state, sub, start, end, next_end, "subscription_cycle")
        finalize(state, invoice, end)
        close_periods(state, sub, start, end, invoice["id"])
        sub["latest_invoice"] = invoice["id"]
        set_period(state, sub, end, next_end)
        changed = True
    if changed:
        state.emit("customer.subscription.updated", render_subscription(state, sub))


def close_periods(state: State, sub: Obj, start: int, end: int, invoice_id: str) -> None:
    for item_id in sub["_item_ids"]:
        state.item_periods.setdefault(item_id, []).append((start, end, invoice_id))


def end_subscription(state: State, sub: Obj, when: int) -> None:
    sub.update(status="canceled", canceled_at=sub.get("canceled_at") or when, ended_at=when)
    state.emit("customer.subscription.deleted", render_subscription(state, sub))


def render_item(item: Obj) -> Obj:
    return {k: v for k, v in item.items() if not k.startswith("_")}


def render_subscription(state: State, sub: Obj) -> Obj:
    items = [render_item(i) for i in live_items(state, sub)]
    out = {k: v for k, v in sub.items() if not k.startswith("_")}
    out["items"] = {
        "object": "list",
        "data": items,
        "has_more": False,
        "total_count": len(items),
        "url": f"/v1/subscription_items?subscription={sub['id']}",
    }
    return out
