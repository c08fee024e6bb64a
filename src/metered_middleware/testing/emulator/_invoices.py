"""Invoices (previews and the ones a rollover finalized) and Checkout Sessions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ._billing import build_invoice, period_boundary, roll
from ._common import EXPAND, METADATA, RETRIEVE, Ctx, get, list_schema, paginate, route
from ._errors import invalid
from ._params import Arr, Bool, Enum, Int, Obj, Str, require_one
from ._resources import create_customer
from ._state import Obj as Json
from ._state import new_id
from ._subscriptions import check_price, create_subscription_obj, subscription_for

# -- invoices -------------------------------------------------------------------------------------

PREVIEW = Obj(
    {
        "customer": Str(),
        "subscription": Str(),
        "automatic_tax": Obj({"enabled": Bool()}, ["enabled"]),
        "currency": Str(3),
        "preview_mode": Enum("next", "recurring"),
        "expand": EXPAND,
    }
)


def preview_invoice(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    """The next invoice for a subscription: this period's usage and the next period's licenses."""
    state = ctx.state
    require_one(p, "customer", "subscription")
    if p.get("subscription"):
        sub = subscription_for(ctx, p["subscription"], "subscription")
        if p.get("customer") not in (None, sub["customer"]):
            raise invalid("The subscription does not belong to this customer.", param="customer")
    else:
        get(state.customers, "customer", p["customer"], "customer")
        subs = [
            s
            for s in state.subscriptions.values()
            if s["customer"] == p["customer"] and s["status"] != "canceled"
        ]
        if not subs:
            raise invalid(f"No upcoming invoices for customer: {p['customer']}", code="invoice_upcoming_none")
        sub = subs[-1]
        roll(state, sub)
    if sub["status"] == "canceled":
        raise invalid(f"No upcoming invoices for customer: {sub['customer']}", code="invoice_upcoming_none")
    start, end = sub["current_period_start"], sub["current_period_end"]
    interval, count = sub["_interval"]
    next_end = (
        None
        if sub["cancel_at_period_end"]
        else period_boundary(sub["billing_cycle_anchor"], interval, count, sub["_periods"] + 2)
    )
    invoice = build_invoice(state, sub, start, end, next_end, "upcoming")
    invoice["id"] = "upcoming_" + new_id("in")
    return invoice


def list_invoices(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    state = ctx.state
    if p.get("subscription"):
        roll(state, get(state.subscriptions, "subscription", p["subscription"], "subscription"))
    found = [
        inv
        for inv in state.invoices.values()
        if p.get("customer") in (None, inv["customer"])
        and p.get("subscription") in (None, inv["subscription"])
        and p.get("status") in (None, inv["status"])
    ]
    return paginate(found, p, "/v1/invoices")


def retrieve_invoice(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return get(ctx.state.invoices, "invoice", ids[0])


# -- checkout -------------------------------------------------------------------------------------

CHECKOUT_CREATE = Obj(
    {
        "mode": Enum("payment", "setup", "subscription"),
        "line_items": Arr(Obj({"price": Str(), "quantity": Int()}, ["price"]), 20),
        "success_url": Str(5000),
        "cancel_url": Str(5000),
        "return_url": Str(5000),
        "customer": Str(),
        "customer_email": Str(),
        "client_reference_id": Str(200),
        "metadata": METADATA,
        "subscription_data": Obj(
            {"metadata": METADATA, "description": Str(500), "billing_cycle_anchor": Int()}
        ),
        "allow_promotion_codes": Bool(),
        "billing_address_collection": Enum("auto", "required"),
        "payment_method_types": Arr(Str()),
        "automatic_tax": Obj({"enabled": Bool()}, ["enabled"]),
        "tax_id_collection": Obj({"enabled": Bool()}, ["enabled"]),
        "locale": Str(),
        "ui_mode": Enum("custom", "embedded", "hosted"),
        "expires_at": Int(),
        "expand": EXPAND,
    },
    ["mode"],
)


def create_checkout(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    state = ctx.state
    if p["mode"] != "subscription":
        raise invalid("The emulator implements Checkout Sessions with mode=subscription only.", param="mode")
    if not p.get("line_items"):
        raise invalid(
            "`line_items` is required in subscription mode.", param="line_items", code="parameter_missing"
        )
    if p.get("customer") is not None:
        get(state.customers, "customer", p["customer"], "customer")
        if p.get("customer_email") is not None:
            raise invalid(
                "You may only specify one of these parameters: customer, customer_email.",
                param="customer_email",
                code="parameters_exclusive",
            )
    for i, line in enumerate(p["line_items"]):
        check_price(ctx, line["price"], line.get("quantity"), f"line_items[{i}]")
    session_id = "cs_test_" + new_id("x")[2:] + new_id("x")[2:]
    now = state.customer_now(p.get("customer"))
    session: Json = {
        "id": session_id,
        "object": "checkout.session",
        "cancel_url": p.get("cancel_url"),
        "client_reference_id": p.get("client_reference_id"),
        "created": now,
        "customer": p.get("customer"),
        "customer_email": p.get("customer_email"),
        "expires_at": p.get("expires_at", now + 86400),
        "livemode": False,
        "metadata": p.get("metadata", {}),
        "mode": "subscription",
        "payment_status": "unpaid",
        "status": "open",
        "subscription": None,
        "success_url": p.get("success_url"),
        "url": f"{state.base_url}/checkout/{session_id}",
        "_line_items": p["line_items"],
        "_subscription_data": p.get("subscription_data", {}),
        # Completing the session later must see its prices as this request did: a legacy metered price
        # exists only on API versions before 2025-03-31.
        "_stripe_version": ctx.stripe_version,
    }
    state.checkout_sessions[session_id] = session
    return render_checkout(session)


def render_checkout(session: Json) -> Json:
    return {k: v for k, v in session.items() if not k.startswith("_")}


def retrieve_checkout(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return render_checkout(get(ctx.state.checkout_sessions, "checkout.session", ids[0]))


def expire_checkout(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    session = get(ctx.state.checkout_sessions, "checkout.session", ids[0])
    if session["status"] != "open":
        raise invalid(
            f"Only Checkout Sessions with a status of `open` can be expired; this one is "
            f"`{session['status']}`."
        )
    session["status"] = "expired"
    ctx.state.emit("checkout.session.expired", render_checkout(session))
    return render_checkout(session)


def list_checkouts(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    found = [
        render_checkout(s)
        for s in ctx.state.checkout_sessions.values()
        if p.get("subscription") in (None, s["subscription"]) and p.get("customer") in (None, s["customer"])
    ]
    return paginate(found, p, "/v1/checkout/sessions")


def complete_checkout(ctx: Ctx, session_id: str, test_clock: str | None) -> dict[str, str]:
    """What a customer paying on the hosted page causes: a customer, a subscription, webhooks."""
    state = ctx.state
    session = get(state.checkout_sessions, "checkout.session", session_id)
    if session["status"] != "open":
        raise invalid(f"Checkout Session {session_id} is {session['status']}, not open.")
    customer_id = session["customer"]
    if customer_id is None:
        params: dict[str, Any] = {"email": session["customer_email"]}
        if test_clock is not None:
            params["test_clock"] = test_clock
        customer_id = create_customer(ctx, params, ())["id"]
    data = session["_subscription_data"]
    sub_params: dict[str, Any] = {
        "customer": customer_id,
        "items": session["_line_items"],
        "metadata": data.get("metadata", {}),
    }
    if data.get("billing_cycle_anchor") is not None:
        sub_params["billing_cycle_anchor"] = data["billing_cycle_anchor"]
    sub = create_subscription_obj(replace(ctx, stripe_version=session.get("_stripe_version")), sub_params)
    session.update(customer=customer_id, subscription=sub["id"], status="complete", payment_status="paid")
    state.emit("checkout.session.completed", render_checkout(session))
    return {"customer": customer_id, "subscription": sub["id"], "subscription_item": sub["_item_ids"][0]}


ROUTES = [
    route("POST", "/v1/invoices/create_preview", "invoices.create_preview", PREVIEW, preview_invoice),
    route("GET", "/v1/invoices/upcoming", "invoices.upcoming", PREVIEW, preview_invoice, legacy_only=True),
    route(
        "GET",
        "/v1/invoices",
        "invoices.list",
        list_schema(
            customer=Str(), subscription=Str(), status=Enum("draft", "open", "paid", "uncollectible", "void")
        ),
        list_invoices,
    ),
    route("GET", "/v1/invoices/{id}", "invoices.retrieve", RETRIEVE, retrieve_invoice),
    route("POST", "/v1/checkout/sessions", "checkout_sessions.create", CHECKOUT_CREATE, create_checkout),
    route(
        "GET",
        "/v1/checkout/sessions",
        "checkout_sessions.list",
        list_schema(customer=Str(), subscription=Str()),
        list_checkouts,
    ),
    route("GET", "/v1/checkout/sessions/{id}", "checkout_sessions.retrieve", RETRIEVE, retrieve_checkout),
    route("POST", "/v1/checkout/sessions/{id}/expire", "checkout_sessions.expire", RETRIEVE, expire_checkout),
]
