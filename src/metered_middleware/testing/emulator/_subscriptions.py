"""Subscriptions and their items, invoices (previews and finalized), and Checkout Sessions."""

from __future__ import annotations

from typing import Any

from ._billing import (
    build_invoice,
    end_subscription,
    finalize,
    is_metered,
    live_items,
    period_boundary,
    render_item,
    render_subscription,
    roll,
)
from ._common import EXPAND, METADATA, RETRIEVE, Ctx, get, list_schema, paginate, route
from ._errors import invalid
from ._params import Arr, Bool, Enum, Int, Obj, Str
from ._state import Obj as Json
from ._state import State, new_id

_PRORATION = Enum("always_invoice", "create_prorations", "none")
_ITEM = Obj({"price": Str(), "quantity": Int(), "metadata": METADATA}, ["price"])
SUBSCRIPTION_CREATE = Obj(
    {
        "customer": Str(),
        "items": Arr(_ITEM, 20),
        "metadata": METADATA,
        "billing_cycle_anchor": Int(),
        "cancel_at_period_end": Bool(),
        "collection_method": Enum("charge_automatically", "send_invoice"),
        "days_until_due": Int(),
        "default_payment_method": Str(),
        "description": Str(500),
        "off_session": Bool(),
        "payment_behavior": Enum(
            "allow_incomplete", "default_incomplete", "error_if_incomplete", "pending_if_incomplete"
        ),
        "proration_behavior": _PRORATION,
        "expand": EXPAND,
    },
    ["customer", "items"],
)
SUBSCRIPTION_UPDATE = Obj(
    {
        "metadata": METADATA,
        "cancel_at_period_end": Bool(),
        "default_payment_method": Str(nullable=True),
        "description": Str(500, nullable=True),
        "proration_behavior": _PRORATION,
        "expand": EXPAND,
    }
)
SUBSCRIPTION_CANCEL = Obj(
    {
        "invoice_now": Bool(),
        "prorate": Bool(),
        "cancellation_details": Obj({"comment": Str(nullable=True), "feedback": Str()}),
        "expand": EXPAND,
    }
)


def check_price(ctx: Ctx, price_id: str, quantity: int | None, param: str) -> Json:
    price = get(ctx.state.prices, "price", price_id, f"{param}[price]")
    recurring = price.get("recurring")
    if recurring is None:
        raise invalid("The price specified is not recurring.", param=f"{param}[price]")
    if not price["active"]:
        raise invalid("The price specified is inactive.", param=f"{param}[price]")
    if is_metered(price):
        if quantity is not None:
            raise invalid(
                "Quantity should not be specified where usage_type is `metered`. Remove "
                "quantity from the request.",
                param=f"{param}[quantity]",
            )
        if not recurring.get("meter") and not ctx.legacy:
            raise invalid(
                "Legacy usage-based prices (metered, without a meter) cannot be attached to "
                "subscriptions since 2025-03-31.basil.",
                param=f"{param}[price]",
            )
    return price


def _new_item(state: State, sub: Json, price: Json, quantity: int | None, metadata: Any) -> Json:
    item: Json = {
        "id": new_id("si"),
        "object": "subscription_item",
        "created": state.customer_now(sub["customer"]),
        "current_period_start": sub["current_period_start"],
        "current_period_end": sub["current_period_end"],
        "metadata": metadata or {},
        "price": price,
        "subscription": sub["id"],
    }
    if not is_metered(price):
        item["quantity"] = 1 if quantity is None else quantity
    state.items[item["id"]] = item
    sub["_item_ids"].append(item["id"])
    return item


def create_subscription_obj(ctx: Ctx, p: dict[str, Any]) -> Json:
    """Create a subscription; shared by the API route and by completing a Checkout Session."""
    state = ctx.state
    customer = get(state.customers, "customer", p["customer"], "customer")
    if not p["items"]:
        raise invalid("Missing required param: items.", param="items", code="parameter_missing")
    prices = [
        check_price(ctx, it["price"], it.get("quantity"), f"items[{i}]") for i, it in enumerate(p["items"])
    ]
    intervals = {(pr["recurring"]["interval"], pr["recurring"]["interval_count"]) for pr in prices}
    if len(intervals) > 1:
        raise invalid("All prices on a subscription must have the same billing interval.", param="items")
    interval, count = intervals.pop()
    start = state.customer_now(customer["id"])
    anchor = p.get("billing_cycle_anchor", start)
    if anchor < start:
        raise invalid("`billing_cycle_anchor` cannot be in the past.", param="billing_cycle_anchor")
    periods = -1 if anchor > start else 0
    sub: Json = {
        "id": new_id("sub"),
        "object": "subscription",
        "billing_cycle_anchor": anchor,
        "cancel_at_period_end": p.get("cancel_at_period_end", False),
        "canceled_at": None,
        "collection_method": p.get("collection_method", "charge_automatically"),
        "created": start,
        "current_period_start": start,
        "current_period_end": period_boundary(anchor, interval, count, periods + 1),
        "customer": customer["id"],
        "default_payment_method": p.get("default_payment_method"),
        "description": p.get("description"),
        "ended_at": None,
        "latest_invoice": None,
        "livemode": False,
        "metadata": p.get("metadata", {}),
        "start_date": start,
        "status": "active",
        "test_clock": customer.get("test_clock"),
        "_item_ids": [],
        "_interval": (interval, count),
        "_periods": periods,
    }
    state.subscriptions[sub["id"]] = sub
    for it, price in zip(p["items"], prices, strict=True):
        _new_item(state, sub, price, it.get("quantity"), it.get("metadata"))
    invoice = build_invoice(state, sub, start, start, sub["current_period_end"], "subscription_create")
    sub["latest_invoice"] = finalize(state, invoice, start)["id"]
    state.emit("customer.subscription.created", render_subscription(state, sub), request=ctx.request_id)
    return sub


def create_subscription(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    return render_subscription(ctx.state, create_subscription_obj(ctx, p))


def subscription_for(ctx: Ctx, sub_id: str, param: str | None = None) -> Json:
    sub = get(ctx.state.subscriptions, "subscription", sub_id, param)
    roll(ctx.state, sub)
    return sub


def retrieve_subscription(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return render_subscription(ctx.state, subscription_for(ctx, ids[0]))


def update_subscription(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    sub = subscription_for(ctx, ids[0])
    if sub["status"] == "canceled":
        raise invalid("A canceled subscription can only update its cancellation_details and metadata.")
    if "metadata" in p:
        sub["metadata"] = {**sub["metadata"], **p["metadata"]} if p["metadata"] else {}
    for name in ("cancel_at_period_end", "default_payment_method", "description"):
        if name in p:
            sub[name] = p[name]
    out = render_subscription(ctx.state, sub)
    ctx.state.emit("customer.subscription.updated", out, request=ctx.request_id)
    return out


def cancel_subscription(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    state = ctx.state
    sub = subscription_for(ctx, ids[0])
    if sub["status"] == "canceled":
        raise invalid(
            f"No such subscription: '{sub['id']}'; it has already been canceled.",
            code="resource_missing",
            status=404,
        )
    now = state.customer_now(sub["customer"])
    if p.get("invoice_now"):
        invoice = build_invoice(state, sub, sub["current_period_start"], now, None, "subscription_cycle")
        sub["latest_invoice"] = finalize(state, invoice, now)["id"]
    sub["canceled_at"] = now
    end_subscription(state, sub, now)
    return render_subscription(state, sub)


def list_subscriptions(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    state = ctx.state
    status = p.get("status")
    found = []
    for sub in state.subscriptions.values():
        roll(state, sub)
        if p.get("customer") not in (None, sub["customer"]):
            continue
        if p.get("test_clock") not in (None, sub["test_clock"]):
            continue
        if p.get("price") and all(i["price"]["id"] != p["price"] for i in live_items(state, sub)):
            continue
        if status == "all" or status == sub["status"] or (status is None and sub["status"] != "canceled"):
            found.append(render_subscription(state, sub))
    return paginate(found, p, "/v1/subscriptions")


# -- subscription items ---------------------------------------------------------------------------

ITEM_CREATE = Obj(
    {
        "subscription": Str(),
        "price": Str(),
        "quantity": Int(),
        "metadata": METADATA,
        "proration_behavior": _PRORATION,
        "payment_behavior": Enum(
            "allow_incomplete", "default_incomplete", "error_if_incomplete", "pending_if_incomplete"
        ),
        "expand": EXPAND,
    },
    ["subscription", "price"],
)
ITEM_UPDATE = Obj(
    {"quantity": Int(), "metadata": METADATA, "proration_behavior": _PRORATION, "expand": EXPAND}
)
ITEM_DELETE = Obj({"clear_usage": Bool(), "proration_behavior": _PRORATION, "proration_date": Int()})


def item_for(ctx: Ctx, item_id: str, param: str | None = None) -> Json:
    """A live subscription item, its subscription rolled to now; deleted items are 404s."""
    item = get(ctx.state.items, "subscription_item", item_id, param)
    roll(ctx.state, ctx.state.subscriptions[item["subscription"]])
    return item


def create_item(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    sub = subscription_for(ctx, p["subscription"], "subscription")
    price = check_price(ctx, p["price"], p.get("quantity"), "price")
    if (price["recurring"]["interval"], price["recurring"]["interval_count"]) != tuple(sub["_interval"]):
        raise invalid("All prices on a subscription must have the same billing interval.", param="price")
    item = _new_item(ctx.state, sub, price, p.get("quantity"), p.get("metadata"))
    ctx.state.emit("customer.subscription.updated", render_subscription(ctx.state, sub))
    return render_item(item)


def retrieve_item(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return render_item(item_for(ctx, ids[0]))


def update_item(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    item = item_for(ctx, ids[0])
    if "quantity" in p:
        if is_metered(item["price"]):
            raise invalid("Quantity should not be specified where usage_type is `metered`.", param="quantity")
        item["quantity"] = p["quantity"]
    if "metadata" in p:
        item["metadata"] = {**item["metadata"], **p["metadata"]} if p["metadata"] else {}
    return render_item(item)


def delete_item(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    state = ctx.state
    item = item_for(ctx, ids[0])
    sub = state.subscriptions[item["subscription"]]
    if len(sub["_item_ids"]) <= 1:
        raise invalid(
            "A subscription must have at least one active plan. To cancel a subscription, please "
            "use the cancel API endpoint on /v1/subscriptions."
        )
    if p.get("clear_usage"):
        state.usage.pop(item["id"], None)
    sub["_item_ids"].remove(item["id"])
    del state.items[item["id"]]
    state.deleted_items.add(item["id"])
    state.emit("customer.subscription.updated", render_subscription(state, sub))
    return {"id": item["id"], "object": "subscription_item", "deleted": True}


def list_items(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    sub = subscription_for(ctx, p["subscription"], "subscription")
    items = [render_item(i) for i in live_items(ctx.state, sub)]
    return paginate(items, p, "/v1/subscription_items")


ROUTES = [
    route("POST", "/v1/subscriptions", "subscriptions.create", SUBSCRIPTION_CREATE, create_subscription),
    route(
        "GET",
        "/v1/subscriptions",
        "subscriptions.list",
        list_schema(
            customer=Str(),
            price=Str(),
            test_clock=Str(),
            status=Enum(
                "active",
                "all",
                "canceled",
                "ended",
                "incomplete",
                "incomplete_expired",
                "past_due",
                "paused",
                "trialing",
                "unpaid",
            ),
        ),
        list_subscriptions,
    ),
    route("GET", "/v1/subscriptions/{id}", "subscriptions.retrieve", RETRIEVE, retrieve_subscription),
    route("POST", "/v1/subscriptions/{id}", "subscriptions.update", SUBSCRIPTION_UPDATE, update_subscription),
    route(
        "DELETE", "/v1/subscriptions/{id}", "subscriptions.cancel", SUBSCRIPTION_CANCEL, cancel_subscription
    ),
    route("POST", "/v1/subscription_items", "subscription_items.create", ITEM_CREATE, create_item),
    route(
        "GET",
        "/v1/subscription_items",
        "subscription_items.list",
        Obj({**list_schema().fields, "subscription": Str()}, ["subscription"]),
        list_items,
    ),
    route("GET", "/v1/subscription_items/{id}", "subscription_items.retrieve", RETRIEVE, retrieve_item),
    route("POST", "/v1/subscription_items/{id}", "subscription_items.update", ITEM_UPDATE, update_item),
    route("DELETE", "/v1/subscription_items/{id}", "subscription_items.delete", ITEM_DELETE, delete_item),
]
