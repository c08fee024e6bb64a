"""Customers, products, prices, meters and test clocks."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ._billing import roll
from ._common import EXPAND, METADATA, RETRIEVE, Ctx, deleted, get, list_schema, paginate, route
from ._errors import invalid, missing
from ._params import Arr, Bool, Dec, Enum, Int, IntOr, Obj, Str, exclusive, require_one
from ._state import Obj as Json
from ._state import new_id

# -- customers ------------------------------------------------------------------------------------

_CUSTOMER_FIELDS = {
    "email": Str(512, nullable=True),
    "name": Str(256, nullable=True),
    "description": Str(nullable=True),
    "phone": Str(20, nullable=True),
    "metadata": METADATA,
    "payment_method": Str(),
    "invoice_settings": Obj({"default_payment_method": Str(nullable=True)}),
    "expand": EXPAND,
}
CUSTOMER_CREATE = Obj({**_CUSTOMER_FIELDS, "test_clock": Str()})
CUSTOMER_UPDATE = Obj(_CUSTOMER_FIELDS)


def create_customer(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    state = ctx.state
    clock = p.get("test_clock")
    if clock is not None:
        get(state.clocks, "test_helpers.test_clock", clock, "test_clock")
    customer: Json = {
        "id": new_id("cus"),
        "object": "customer",
        "created": state.clocks[clock]["frozen_time"] if clock else state.now(),
        "description": p.get("description"),
        "email": p.get("email"),
        "livemode": False,
        "metadata": p.get("metadata", {}),
        "name": p.get("name"),
        "phone": p.get("phone"),
        "test_clock": clock,
        "invoice_settings": {
            "default_payment_method": (p.get("invoice_settings") or {}).get("default_payment_method")
        },
    }
    state.customers[customer["id"]] = customer
    state.emit("customer.created", customer, request=ctx.request_id)
    return customer


def retrieve_customer(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return get(ctx.state.customers, "customer", ids[0])


def update_customer(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    customer = get(ctx.state.customers, "customer", ids[0])
    p.pop("expand", None)
    settings = p.pop("invoice_settings", None)
    if "metadata" in p:
        customer["metadata"] = {**customer["metadata"], **p.pop("metadata")} if p["metadata"] else {}
    customer.update(p)
    if settings is not None:
        customer["invoice_settings"].update(settings)
    ctx.state.emit("customer.updated", customer, request=ctx.request_id)
    return customer


def delete_customer(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    customer = get(ctx.state.customers, "customer", ids[0])
    customer["deleted"] = True
    return deleted(customer["id"], "customer")


def list_customers(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    found = [
        c
        for c in ctx.state.customers.values()
        if not c.get("deleted")
        and (p.get("email") is None or c["email"] == p["email"])
        and (p.get("test_clock") is None or c["test_clock"] == p["test_clock"])
    ]
    return paginate(found, p, "/v1/customers")


# -- products -------------------------------------------------------------------------------------

_PRODUCT_FIELDS = {
    "name": Str(),
    "active": Bool(),
    "description": Str(40000, nullable=True),
    "metadata": METADATA,
    "statement_descriptor": Str(22),
    "tax_code": Str(),
    "unit_label": Str(12, nullable=True),
    "url": Str(nullable=True),
    "expand": EXPAND,
}
PRODUCT_CREATE = Obj({**_PRODUCT_FIELDS, "id": Str()}, ["name"])
PRODUCT_DATA = Obj({k: v for k, v in _PRODUCT_FIELDS.items() if k != "expand"}, ["name"])


def create_product(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    product_id = p.get("id") or new_id("prod")
    if product_id in ctx.state.products:
        raise invalid("Product already exists.", param="id", code="resource_already_exists")
    product: Json = {
        "id": product_id,
        "object": "product",
        "active": p.get("active", True),
        "created": ctx.state.now(),
        "default_price": None,
        "description": p.get("description"),
        "livemode": False,
        "metadata": p.get("metadata", {}),
        "name": p["name"],
        "unit_label": p.get("unit_label"),
        "url": p.get("url"),
    }
    ctx.state.products[product_id] = product
    return product


def retrieve_product(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return get(ctx.state.products, "product", ids[0])


def update_product(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    product = get(ctx.state.products, "product", ids[0])
    p.pop("expand", None)
    product.update(p)
    return product


def list_products(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    ids = set(p.get("ids") or [])
    found = [
        x
        for x in ctx.state.products.values()
        if (p.get("active") is None or x["active"] == p["active"]) and (not ids or x["id"] in ids)
    ]
    return paginate(found, p, "/v1/products")


# -- prices ---------------------------------------------------------------------------------------

_TIER = Obj(
    {
        "up_to": IntOr("inf"),
        "flat_amount": Int(),
        "flat_amount_decimal": Dec(),
        "unit_amount": Int(),
        "unit_amount_decimal": Dec(),
    },
    ["up_to"],
)


def price_create_schema(ctx: Ctx) -> Obj:
    recurring: dict[str, Any] = {
        "interval": Enum("day", "month", "week", "year"),
        "interval_count": Int(),
        "usage_type": Enum("licensed", "metered"),
        "meter": Str(),
        "trial_period_days": Int(),
    }
    if ctx.legacy:
        recurring["aggregate_usage"] = Enum("last_during_period", "last_ever", "max", "sum")
    return Obj(
        {
            "currency": Str(3),
            "product": Str(),
            "product_data": PRODUCT_DATA,
            "unit_amount": Int(),
            "unit_amount_decimal": Dec(),
            "billing_scheme": Enum("per_unit", "tiered"),
            "tiers": Arr(_TIER, 250),
            "tiers_mode": Enum("graduated", "volume"),
            "recurring": Obj(recurring, ["interval"]),
            "lookup_key": Str(200),
            "transfer_lookup_key": Bool(),
            "nickname": Str(),
            "metadata": METADATA,
            "active": Bool(),
            "tax_behavior": Enum("exclusive", "inclusive", "unspecified"),
            "expand": EXPAND,
        },
        ["currency"],
    )


PRICE_UPDATE = Obj(
    {
        "active": Bool(),
        "lookup_key": Str(200),
        "transfer_lookup_key": Bool(),
        "metadata": METADATA,
        "nickname": Str(nullable=True),
        "tax_behavior": Enum("exclusive", "inclusive", "unspecified"),
        "expand": EXPAND,
    }
)
PRICE_LIST = list_schema(
    active=Bool(),
    currency=Str(),
    lookup_keys=Arr(Str(200), 10),
    product=Str(),
    type=Enum("one_time", "recurring"),
    recurring=Obj(
        {
            "interval": Enum("day", "month", "week", "year"),
            "meter": Str(),
            "usage_type": Enum("licensed", "metered"),
        }
    ),
)


def _amount_pair(raw: dict[str, Any], name: str, path: str) -> tuple[int | None, str | None]:
    exclusive(
        {f"{path}{name}": raw.get(name), f"{path}{name}_decimal": raw.get(f"{name}_decimal")},
        f"{path}{name}",
        f"{path}{name}_decimal",
    )
    whole, dec = raw.get(name), raw.get(f"{name}_decimal")
    if dec is not None:
        as_dec: Decimal = dec
        return (int(as_dec) if as_dec == int(as_dec) else None), format(as_dec.normalize(), "f")
    return whole, (str(whole) if whole is not None else None)


def _tiers(p: dict[str, Any]) -> list[Json]:
    tiers_in: list[dict[str, Any]] | None = p.get("tiers")
    if not tiers_in or p.get("tiers_mode") is None:
        raise invalid(
            "Tiered prices require `tiers` and `tiers_mode`.", param="tiers" if not tiers_in else "tiers_mode"
        )
    out: list[Json] = []
    previous = 0
    for index, raw in enumerate(tiers_in):
        path = f"tiers[{index}]["
        unit, unit_dec = _amount_pair(raw, "unit_amount", path)
        flat, flat_dec = _amount_pair(raw, "flat_amount", path)
        up_to = None if raw["up_to"] == "inf" else int(raw["up_to"])
        last = index == len(tiers_in) - 1
        if (up_to is None) != last:
            raise invalid(
                "Only the last tier may have `up_to=inf`, and it must.", param=f"tiers[{index}][up_to]"
            )
        if up_to is not None and up_to <= previous:
            raise invalid("Tiers must be in ascending order of `up_to`.", param=f"tiers[{index}][up_to]")
        previous = up_to or previous
        out.append(
            {
                "flat_amount": flat,
                "flat_amount_decimal": flat_dec,
                "unit_amount": unit,
                "unit_amount_decimal": unit_dec,
                "up_to": up_to,
            }
        )
    return out


def create_price(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    state = ctx.state
    exclusive(p, "product", "product_data")
    require_one(p, "product", "product_data")
    if p.get("product") is not None:
        product_id = get(state.products, "product", p["product"], "product")["id"]
    else:
        product_id = create_product(ctx, dict(p["product_data"]), ())["id"]
    scheme = p.get("billing_scheme", "per_unit")
    tiers: list[Json] | None = None
    unit, unit_dec = None, None
    if scheme == "tiered":
        if p.get("unit_amount") is not None or p.get("unit_amount_decimal") is not None:
            raise invalid("Tiered prices cannot have `unit_amount`.", param="unit_amount")
        tiers = _tiers(p)
    else:
        if p.get("tiers") is not None:
            raise invalid("`tiers` requires `billing_scheme=tiered`.", param="tiers")
        unit, unit_dec = _amount_pair(p, "unit_amount", "")
        if unit_dec is None:
            raise invalid(
                "Missing required param: unit_amount.", param="unit_amount", code="parameter_missing"
            )
    recurring = _recurring(ctx, p.get("recurring"))
    lookup_key = p.get("lookup_key")
    if lookup_key is not None:
        _claim_lookup_key(ctx, lookup_key, bool(p.get("transfer_lookup_key")))
    price: Json = {
        "id": new_id("price"),
        "object": "price",
        "active": p.get("active", True),
        "billing_scheme": scheme,
        "created": state.now(),
        "currency": p["currency"].lower(),
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": p.get("metadata", {}),
        "nickname": p.get("nickname"),
        "product": product_id,
        "recurring": recurring,
        "tax_behavior": p.get("tax_behavior", "unspecified"),
        "tiers_mode": p.get("tiers_mode") if tiers else None,
        "transform_quantity": None,
        "type": "recurring" if recurring else "one_time",
        "unit_amount": unit,
        "unit_amount_decimal": unit_dec,
    }
    if tiers is not None:
        price["tiers"] = tiers
    state.prices[price["id"]] = price
    return price


def _recurring(ctx: Ctx, raw: dict[str, Any] | None) -> Json | None:
    if raw is None:
        return None
    usage_type = raw.get("usage_type", "licensed")
    meter = raw.get("meter")
    if meter is not None:
        get(ctx.state.meters, "billing.meter", meter, "recurring[meter]")
        if usage_type != "metered":
            raise invalid(
                "A price with a meter must have `recurring[usage_type]=metered`.",
                param="recurring[usage_type]",
            )
    elif usage_type == "metered" and not ctx.legacy:
        raise invalid(
            "Metered prices must be backed by a meter: pass `recurring[meter]`. Legacy usage-based "
            "prices were removed in 2025-03-31.basil.",
            param="recurring[meter]",
        )
    if raw.get("aggregate_usage") is not None and usage_type != "metered":
        raise invalid("`aggregate_usage` requires `usage_type=metered`.", param="recurring[aggregate_usage]")
    return {
        "aggregate_usage": raw.get(
            "aggregate_usage", "sum" if usage_type == "metered" and not meter else None
        ),
        "interval": raw["interval"],
        "interval_count": raw.get("interval_count", 1),
        "meter": meter,
        "trial_period_days": raw.get("trial_period_days"),
        "usage_type": usage_type,
    }


def _claim_lookup_key(ctx: Ctx, key: str, transfer: bool) -> None:
    for other in ctx.state.prices.values():
        if other.get("lookup_key") == key:
            if not transfer:
                raise invalid(
                    f"A price (`{other['id']}`) already uses that lookup key.",
                    param="lookup_key",
                )
            other["lookup_key"] = None


def retrieve_price(ctx: Ctx, _: dict[str, Any], ids: tuple[str, ...]) -> Json:
    return get(ctx.state.prices, "price", ids[0])


def update_price(ctx: Ctx, p: dict[str, Any], ids: tuple[str, ...]) -> Json:
    price = get(ctx.state.prices, "price", ids[0])
    if p.get("lookup_key") is not None and p["lookup_key"] != price["lookup_key"]:
        _claim_lookup_key(ctx, p["lookup_key"], bool(p.get("transfer_lookup_key")))
    for name in ("active", "lookup_key", "nickname", "tax_behavior"):
        if name in p:
            price[name] = p[name]
    if "metadata" in p:
        price["metadata"] = {**price["metadata"], **p["metadata"]} if p["metadata"] else {}
    return price


def list_prices(ctx: Ctx, p: dict[str, Any], _: tuple[str, ...]) -> Json:
    keys = set(p.get("lookup_keys") or [])
    recurring = p.get("recurring") or {}

    def keep(x: Json) -> bool:
        rec = x.get("recurring") or {}
        return (
            (not keys or x["lookup_key"] in keys)
            and (p.get("active") is None or x["active"] == p["active"])
            and (p.get("product") is None or x["product"] == p["product"])
            and (p.get("currency") is None or x["currency"] == p["currency"])
            and (p.get("type") is None or x["type"] == p["type"])
            and all(rec.get(k) == v for k, v in recurring.items())
        )

    return paginate(filter(keep, ctx.state.prices.values()), p, "/v1/prices")


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
    route("POST", "/v1/customers", "customers.create", CUSTOMER_CREATE, create_customer),
    route(
        "GET",
        "/v1/customers",
        "customers.list",
        list_schema(email=Str(512), test_clock=Str()),
        list_customers,
    ),
    route("GET", "/v1/customers/{id}", "customers.retrieve", RETRIEVE, retrieve_customer),
    route("POST", "/v1/customers/{id}", "customers.update", CUSTOMER_UPDATE, update_customer),
    route("DELETE", "/v1/customers/{id}", "customers.delete", Obj({}), delete_customer),
    route("POST", "/v1/products", "products.create", PRODUCT_CREATE, create_product),
    route("GET", "/v1/products", "products.list", list_schema(active=Bool(), ids=Arr(Str())), list_products),
    route("GET", "/v1/products/{id}", "products.retrieve", RETRIEVE, retrieve_product),
    route(
        "POST",
        "/v1/products/{id}",
        "products.update",
        Obj({k: v for k, v in PRODUCT_CREATE.fields.items() if k != "id"}),
        update_product,
    ),
    route("POST", "/v1/prices", "prices.create", price_create_schema, create_price),
    route("GET", "/v1/prices", "prices.list", PRICE_LIST, list_prices),
    route("GET", "/v1/prices/{id}", "prices.retrieve", RETRIEVE, retrieve_price),
    route("POST", "/v1/prices/{id}", "prices.update", PRICE_UPDATE, update_price),
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
