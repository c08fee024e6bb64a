"""Reporting usage: legacy usage records, meter events (v1 and the v2 session and stream), summaries."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from ._billing import meter_value, usage_quantity
from ._common import EXPAND, Ctx, get, list_schema, paginate, route
from ._errors import EmulatorError, invalid
from ._params import Arr, Enum, Int, IntOr, Map, Obj, Str
from ._state import DEDUP_HORIZON, MeterEvent, State, new_id
from ._state import Obj as Json
from ._subscriptions import item_for

PAST_WINDOW = 35 * 86400
FUTURE_WINDOW = 5 * 60
SESSION_TTL = 15 * 60
STREAM_MAX_EVENTS = 100

# -- legacy usage records -------------------------------------------------------------------------

USAGE_RECORD = Obj(
    {"quantity": Int(), "timestamp": IntOr("now"), "action": Enum("increment", "set"), "expand": EXPAND},
    ["quantity"],
)


def create_usage_record(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    state = ctx.state
    item = item_for(ctx, ids[0])
    sub = state.subscriptions[item["subscription"]]
    recurring = item["price"]["recurring"]
    if recurring.get("usage_type") != "metered" or recurring.get("meter"):
        raise invalid(
            "Usage records can only be created for subscription items with a legacy metered "
            "price (`recurring[usage_type]=metered` without a meter).",
            param="subscription_item",
        )
    if sub["status"] == "canceled":
        raise invalid(f"Cannot create usage records for the canceled subscription {sub['id']}.")
    now = state.customer_now(sub["customer"])
    ts = now if p.get("timestamp", "now") == "now" else int(p["timestamp"])
    if ts > now:
        raise invalid(
            "Cannot create the usage record with this timestamp because timestamps must be "
            "before the current time.",
            param="timestamp",
        )
    if not sub["current_period_start"] <= ts < sub["current_period_end"]:
        raise invalid(
            "Cannot create the usage record with this timestamp because timestamps must be "
            "within the subscription's current billing period "
            f"({sub['current_period_start']} - {sub['current_period_end']}).",
            param="timestamp",
        )
    records = state.usage.setdefault(item["id"], {})
    if p.get("action", "increment") == "set":
        records[ts] = p["quantity"]
    else:
        records[ts] = records.get(ts, 0) + p["quantity"]
    return {
        "id": new_id("mbur"),
        "object": "usage_record",
        "livemode": False,
        "quantity": p["quantity"],
        "subscription_item": item["id"],
        "timestamp": ts,
    }


def usage_record_summaries(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    state = ctx.state
    item = item_for(ctx, ids[0])
    periods: list[tuple[int, int, str | None]] = list(state.item_periods.get(item["id"], []))
    periods.append((item["current_period_start"], item["current_period_end"], None))
    summaries = [
        {
            "id": f"sis_{item['id'][3:]}_{start}",
            "object": "usage_record_summary",
            "invoice": invoice,
            "livemode": False,
            "period": {"start": start, "end": end},
            "subscription_item": item["id"],
            "total_usage": usage_quantity(state, item, start, end),
        }
        for start, end, invoice in periods
    ]
    return paginate(summaries, p, f"/v1/subscription_items/{item['id']}/usage_record_summaries")


# -- meter events ---------------------------------------------------------------------------------

METER_EVENT = Obj(
    {
        "event_name": Str(100),
        "payload": Map(),
        "identifier": Str(100),
        "timestamp": Int(),
        "expand": EXPAND,
    },
    ["event_name", "payload"],
)


def _event_error(code: str, message: str, param: str) -> EmulatorError:
    return invalid(message, param=param, code=code)


def accept_event(state: State, raw: dict[str, Any], source: str, *, timestamp: int | None) -> MeterEvent:
    """Validate one meter event against meters, customers and windows, and store it.

    The same rules serve v1 (where a failure is the request's 400) and v2 (where Stripe drops
    the event and reports it asynchronously).
    """
    event_name = raw["event_name"]
    meter = state.meter_for_event(event_name)
    if meter is None:
        raise _event_error(
            "no_meter", f"No active meter was found for event_name `{event_name}`.", "event_name"
        )
    if meter["status"] != "active":
        raise _event_error(
            "archived_meter", f"The meter for event_name `{event_name}` is inactive.", "event_name"
        )
    payload: dict[str, str] = raw["payload"]
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    customer = payload.get(customer_key)
    if not customer:
        raise _event_error(
            "meter_event_no_customer_defined",
            f"The payload has no `{customer_key}`.",
            f"payload[{customer_key}]",
        )
    if customer not in state.customers or state.customers[customer].get("deleted"):
        raise _event_error(
            "meter_event_customer_not_found", f"No such customer: '{customer}'", f"payload[{customer_key}]"
        )
    formula = meter["default_aggregation"]["formula"]
    try:
        value = Decimal(payload[value_key]) if value_key in payload else Decimal(1)
    except InvalidOperation:
        value = Decimal("NaN")
    if value_key not in payload and formula != "count":
        raise _event_error(
            "meter_event_value_not_found", f"The payload has no `{value_key}`.", f"payload[{value_key}]"
        )
    if not value.is_finite():
        raise _event_error(
            "meter_event_invalid_value", f"`{value_key}` must be a number.", f"payload[{value_key}]"
        )
    now = state.customer_now(customer)
    ts = now if timestamp is None else timestamp
    if ts < now - PAST_WINDOW:
        raise _event_error(
            "timestamp_too_far_in_past", "Timestamp must be within the past 35 calendar days.", "timestamp"
        )
    if ts > now + FUTURE_WINDOW:
        raise _event_error(
            "timestamp_in_future", "Timestamp must not be more than 5 minutes in the future.", "timestamp"
        )
    identifier = raw.get("identifier") or new_id("mev")
    state.prune_identifiers()
    if identifier in state.identifiers:
        raise EmulatorError(
            400,
            f"An event already exists with identifier {identifier}.",
            code="duplicate_meter_event",
            param="identifier",
            headers={"Stripe-Should-Retry": "false"},
        )
    event = MeterEvent(identifier, event_name, customer, value, ts, state.now(), dict(payload), source)
    state.add_meter_event(event)
    return event


def create_meter_event(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    event = accept_event(ctx.state, p, "v1", timestamp=p.get("timestamp"))
    return {
        "object": "billing.meter_event",
        "created": event.created,
        "event_name": event.event_name,
        "identifier": event.identifier,
        "livemode": False,
        "payload": event.payload,
        "timestamp": event.timestamp,
    }


ADJUSTMENT = Obj(
    {
        "event_name": Str(100),
        "type": Enum("cancel"),
        "cancel": Obj({"identifier": Str(100)}),
        "expand": EXPAND,
    },
    ["event_name", "type"],
)


def create_adjustment(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    """Cancel an event by identifier; like Stripe, applied asynchronously (here: at once) and
    unknown or too-old identifiers are reported, not refused."""
    state = ctx.state
    identifier = (p.get("cancel") or {}).get("identifier")
    if identifier is None:
        raise invalid(
            "Missing required param: cancel[identifier].",
            param="cancel[identifier]",
            code="parameter_missing",
        )
    found = state.identifiers.get(identifier)
    if found and found[0].event_name == p["event_name"] and state.now() - found[1] < DEDUP_HORIZON:
        found[0].canceled = True
    else:
        state.meter_event_errors.append(
            {
                "code": "meter_event_adjustment_not_applied",
                "identifier": identifier,
                "event_name": p["event_name"],
            }
        )
    return {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": identifier},
        "event_name": p["event_name"],
        "livemode": False,
        "status": "pending",
        "type": "cancel",
    }


EVENT_SUMMARIES = Obj(
    {
        **list_schema().fields,
        "customer": Str(),
        "start_time": Int(),
        "end_time": Int(),
        "value_grouping_window": Enum("day", "hour"),
    },
    ["customer", "start_time", "end_time"],
)


def event_summaries(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    state = ctx.state
    meter = get(state.meters, "billing.meter", ids[0])
    get(state.customers, "customer", p["customer"], "customer")
    start, end = p["start_time"], p["end_time"]
    if end <= start:
        raise invalid("`end_time` must be after `start_time`.", param="end_time")
    window = {"hour": 3600, "day": 86400}.get(p.get("value_grouping_window") or "", end - start)
    summaries = []
    cursor = start
    while cursor < end:
        stop = min(cursor + window, end)
        value = meter_value(state, p["customer"], meter, cursor, stop)
        summaries.append(
            {
                "id": f"mtrusg_{meter['id'][4:]}_{cursor}",
                "object": "billing.meter_event_summary",
                "aggregated_value": int(value) if value == int(value) else float(value),
                "end_time": stop,
                "livemode": False,
                "meter": meter["id"],
                "start_time": cursor,
            }
        )
        cursor = stop
    # Stripe lists summaries newest first; paginate reverses insertion order.
    return paginate(summaries, p, f"/v1/billing/meters/{meter['id']}/event_summaries")


# -- v2: meter event session and stream -----------------------------------------------------------


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _from_iso(value: str, path: str) -> int:
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError as exc:
        raise invalid(f"Invalid timestamp: {value}", param=path) from exc


def create_session(ctx: Ctx, _: dict[str, Any], __: tuple[str, ...]) -> Json:
    state = ctx.state
    now = state.now()
    token = "mes_tok_" + secrets.token_urlsafe(24)
    state.sessions[token] = now + SESSION_TTL
    return {
        "id": new_id("mes"),
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": _iso(now),
        "expires_at": _iso(now + SESSION_TTL),
        "livemode": False,
    }


_STREAM_EVENT = Obj(
    {"event_name": Str(100), "identifier": Str(100), "payload": Map(), "timestamp": Str()},
    ["event_name", "payload"],
)
STREAM = Obj({"events": Arr(_STREAM_EVENT, STREAM_MAX_EVENTS)}, ["events"])


def check_session(state: State, token: str) -> None:
    """The stream authenticates with a session token, never an API key."""
    expires = state.sessions.get(token)
    if expires is None:
        raise EmulatorError(
            401,
            "The meter event session token is not valid.",
            type="invalid_request_error",
            code="invalid_session_token",
        )
    if state.now() >= expires:
        raise EmulatorError(
            401,
            "The temporary session token has expired.",
            type="temporary_session_expired",
            code="billing_meter_event_session_expired",
        )


def stream_events(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    """Accept the batch; bad events are dropped and reported, as Stripe processes them later."""
    state = ctx.state
    for index, raw in enumerate(p["events"]):
        ts = raw.get("timestamp")
        try:
            stamp = _from_iso(ts, f"events[{index}][timestamp]") if ts is not None else None
            accept_event(state, raw, "v2", timestamp=stamp)
        except EmulatorError as exc:
            state.meter_event_errors.append(
                {
                    "code": exc.code,
                    "message": exc.message,
                    "identifier": raw.get("identifier"),
                    "event_name": raw.get("event_name"),
                }
            )
    return {}


ROUTES = [
    route(
        "POST",
        "/v1/subscription_items/{id}/usage_records",
        "usage_records.create",
        USAGE_RECORD,
        create_usage_record,
        legacy_only=True,
    ),
    route(
        "GET",
        "/v1/subscription_items/{id}/usage_record_summaries",
        "usage_record_summaries.list",
        list_schema(),
        usage_record_summaries,
        legacy_only=True,
    ),
    route("POST", "/v1/billing/meter_events", "meter_events.create", METER_EVENT, create_meter_event),
    route(
        "POST",
        "/v1/billing/meter_event_adjustments",
        "meter_event_adjustments.create",
        ADJUSTMENT,
        create_adjustment,
    ),
    route(
        "GET",
        "/v1/billing/meters/{id}/event_summaries",
        "meter_event_summaries.list",
        EVENT_SUMMARIES,
        event_summaries,
    ),
    route(
        "POST",
        "/v2/billing/meter_event_session",
        "meter_event_session.create",
        Obj({}),
        create_session,
        v2=True,
    ),
    route(
        "POST", "/v2/billing/meter_event_stream", "meter_event_stream.create", STREAM, stream_events, v2=True
    ),
]

__all__ = ["ROUTES", "accept_event", "check_session"]
