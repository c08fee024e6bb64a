"""Customers, products and prices."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ._common import EXPAND, METADATA, RETRIEVE, Ctx, deleted, get, list_schema, paginate, route
from ._errors import invalid
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
]
