"""Billing meters and test clocks."""

from __future__ import annotations

from typing import Any

from ._billing import roll
from ._common import EXPAND, RETRIEVE, Ctx, deleted, get, list_schema, paginate, route
from ._errors import invalid, missing
from ._params import Enum, Int, Obj, Str
from ._state import Obj as Json
from ._state import new_id

# -- meters ---------------------------------------------------------------------------------------

METER_CREATE = Obj(
    {
        "display_name": Str(250),
        "event_name": Str(100),
        "default_aggregation": Obj({"formula": Enum("count", "last", "sum")}, ["formula"]),
        "customer_mapping": Obj(
            {"event_payload_key": Str(100), "type": Enum("by_id")}, ["event_payload_key", "type"]
        ),
        "value_settings": Obj({"event_payload_key": Str(100)}, ["event_payload_key"]),
        "event_time_window": Enum("day", "hour"),
        "expand": EXPAND,
    },
    ["default_aggregation", "display_name", "event_name"],
)
METER_UPDATE = Obj({"display_name": Str(250), "expand": EXPAND})


def create_meter(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    state = ctx.state
    active = state.meter_for_event(p["event_name"])
    if active is not None and active["status"] == "active":
        raise invalid(f"A meter with the event_name `{p['event_name']}` already exists.", param="event_name")
    now = state.now()
    meter: Json = {
        "id": new_id("mtr"),
        "object": "billing.meter",
        "created": now,
        "customer_mapping": p.get(
            "customer_mapping", {"event_payload_key": "stripe_customer_id", "type": "by_id"}
        ),
        "default_aggregation": p["default_aggregation"],
        "display_name": p["display_name"],
        "event_name": p["event_name"],
        "event_time_window": p.get("event_time_window"),
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": now,
        "value_settings": p.get("value_settings", {"event_payload_key": "value"}),
    }
    state.meters[meter["id"]] = meter
    return meter


def retrieve_meter(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return get(ctx.state.meters, "billing.meter", ids[0])


def update_meter(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    meter = get(ctx.state.meters, "billing.meter", ids[0])
    if "display_name" in p:
        meter.update(display_name=p["display_name"], updated=ctx.state.now())
    return meter


def set_meter_status(active: bool) -> Any:
    def handler(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
        meter = get(ctx.state.meters, "billing.meter", ids[0])
        now = ctx.state.now()
        if active and meter["status"] != "active":
            other = ctx.state.meter_for_event(meter["event_name"])
            if other is not None and other["status"] == "active":
                raise invalid("Another active meter uses this event_name.", param="event_name")
        meter.update(
            status="active" if active else "inactive",
            updated=now,
            status_transitions={"deactivated_at": None if active else now},
        )
        return meter

    return handler


def list_meters(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    found = [m for m in ctx.state.meters.values() if p.get("status") in (None, m["status"])]
    return paginate(found, p, "/v1/billing/meters")


# -- test clocks ----------------------------------------------------------------------------------

CLOCK_CREATE = Obj({"frozen_time": Int(), "name": Str(300), "expand": EXPAND}, ["frozen_time"])
CLOCK_ADVANCE = Obj({"frozen_time": Int(), "expand": EXPAND}, ["frozen_time"])


def create_clock(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    clock: Json = {
        "id": new_id("clock"),
        "object": "test_helpers.test_clock",
        "created": ctx.state.now(),
        "deletes_after": ctx.state.now() + 30 * 86400,
        "frozen_time": p["frozen_time"],
        "livemode": False,
        "name": p.get("name"),
        "status": "ready",
        "status_details": {},
    }
    ctx.state.clocks[clock["id"]] = clock
    return clock


def retrieve_clock(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    clock = get(ctx.state.clocks, "test_helpers.test_clock", ids[0])
    # The advance already happened synchronously; the clock reads "ready" from the next look on.
    clock["status"] = "ready"
    return clock


def advance_clock(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    state = ctx.state
    clock = get(state.clocks, "test_helpers.test_clock", ids[0])
    if p["frozen_time"] <= clock["frozen_time"]:
        raise invalid(
            "The test clock can only be advanced forward: `frozen_time` must be after the "
            "current frozen time.",
            param="frozen_time",
        )
    clock["frozen_time"] = p["frozen_time"]
    customers = {c for c, v in state.customers.items() if v.get("test_clock") == clock["id"]}
    for sub in list(state.subscriptions.values()):
        if sub["customer"] in customers:
            roll(state, sub)
    # Stripe answers an advance with "advancing" and flips to "ready" when done.
    return {**clock, "status": "advancing"}


def delete_clock(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    if ids[0] not in ctx.state.clocks:
        raise missing("test_helpers.test_clock", ids[0])
    del ctx.state.clocks[ids[0]]
    return deleted(ids[0], "test_helpers.test_clock")


def list_clocks(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    return paginate(ctx.state.clocks.values(), p, "/v1/test_helpers/test_clocks")


ROUTES = [
    route("POST", "/v1/billing/meters", "meters.create", METER_CREATE, create_meter),
    route(
        "GET",
        "/v1/billing/meters",
        "meters.list",
        list_schema(status=Enum("active", "inactive")),
        list_meters,
    ),
    route("GET", "/v1/billing/meters/{id}", "meters.retrieve", RETRIEVE, retrieve_meter),
    route("POST", "/v1/billing/meters/{id}", "meters.update", METER_UPDATE, update_meter),
    route(
        "POST", "/v1/billing/meters/{id}/deactivate", "meters.deactivate", RETRIEVE, set_meter_status(False)
    ),
    route(
        "POST", "/v1/billing/meters/{id}/reactivate", "meters.reactivate", RETRIEVE, set_meter_status(True)
    ),
    route("POST", "/v1/test_helpers/test_clocks", "test_clocks.create", CLOCK_CREATE, create_clock),
    route("GET", "/v1/test_helpers/test_clocks", "test_clocks.list", list_schema(), list_clocks),
    route("GET", "/v1/test_helpers/test_clocks/{id}", "test_clocks.retrieve", RETRIEVE, retrieve_clock),
    route(
        "POST",
        "/v1/test_helpers/test_clocks/{id}/advance",
        "test_clocks.advance",
        CLOCK_ADVANCE,
        advance_clock,
    ),
    route("DELETE", "/v1/test_helpers/test_clocks/{id}", "test_clocks.delete", Obj({}), delete_clock),
]
