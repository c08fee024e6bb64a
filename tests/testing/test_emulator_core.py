"""Customers, products, prices, meters, subscriptions and items, and Stripe's request rules."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, cast

import httpx
import pytest
import stripe

from metered_middleware.testing.emulator import EmulatorHTTPXClient, StripeEmulator

from ._helpers import LEGACY, STANDARD_TIERS, make_meter, subscribe


def test_customer_create_retrieve_update_list(stripe_client: stripe.StripeClient) -> None:
    """Customers round-trip through create, retrieve, update and list like on Stripe."""
    created = stripe_client.v1.customers.create({"email": "ada@example.com", "metadata": {"k": "v"}})
    assert created.id.startswith("cus_")
    assert stripe_client.v1.customers.retrieve(created.id).email == "ada@example.com"
    updated = stripe_client.v1.customers.update(created.id, {"name": "Ada"})
    assert updated.name == "Ada"
    assert updated.metadata is not None
    assert updated.metadata["k"] == "v"
    listed = stripe_client.v1.customers.list({"email": "ada@example.com"})
    assert [c.id for c in listed.data] == [created.id]


def test_unknown_customer_is_resource_missing(stripe_client: stripe.StripeClient) -> None:
    """Retrieving an id that does not exist is Stripe's 404 resource_missing."""
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.customers.retrieve("cus_nope")
    assert caught.value.http_status == 404
    assert caught.value.code == "resource_missing"
    assert caught.value.user_message == "No such customer: 'cus_nope'"


def test_missing_api_key_is_401(stripe_emulator: StripeEmulator) -> None:
    """A request without an Authorization header gets Stripe's 401 shape."""
    response = httpx.get(f"{stripe_emulator.url}/v1/customers")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "did not provide an API key" in response.json()["error"]["message"]


def test_malformed_api_key_is_authentication_error(stripe_emulator: StripeEmulator) -> None:
    """A key that is not `sk_test_...` is refused with 401, which the SDK raises as AuthenticationError."""
    client = stripe_emulator.client(api_key="pk_live_123456789")
    with pytest.raises(stripe.AuthenticationError) as caught:
        client.v1.customers.list()
    assert caught.value.http_status == 401
    assert "Invalid API Key provided" in str(caught.value.user_message)


def test_any_test_key_is_accepted(stripe_emulator: StripeEmulator) -> None:
    """Any `sk_test_...` key reaches the same account."""
    first = stripe_emulator.client(api_key="sk_test_one").v1.customers.create({})
    second = stripe_emulator.client(api_key="sk_test_two").v1.customers.retrieve(first.id)
    assert second.id == first.id


def test_unknown_route_is_unrecognized_url(stripe_client: stripe.StripeClient) -> None:
    """An endpoint the emulator does not serve answers like Stripe's unknown URL 404."""
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.raw_request("get", "/v1/nothing_here")
    assert caught.value.http_status == 404
    assert "Unrecognized request URL (GET: /v1/nothing_here)" in str(caught.value.user_message)


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        (
            {"currency": "usd", "unit_amount": 5, "product_data": {"name": "p"}, "bogus": "1"},
            "parameter_unknown",
            "bogus",
        ),
        (
            {"currency": "usd", "unit_amount": "five", "product_data": {"name": "p"}},
            "parameter_invalid_integer",
            "unit_amount",
        ),
        ({"unit_amount": 5, "product_data": {"name": "p"}}, "parameter_missing", "currency"),
        (
            {"currency": "usd", "unit_amount": 5, "product_data": {"name": "p", "x": "y"}},
            "parameter_unknown",
            "product_data[x]",
        ),
        (
            {"currency": "usd", "unit_amount": 5, "product": "prod_x", "product_data": {"name": "p"}},
            "parameters_exclusive",
            "product_data",
        ),
        (
            {"currency": "usd", "unit_amount": "", "product_data": {"name": "p"}},
            "parameter_invalid_empty",
            "unit_amount",
        ),
    ],
)
def test_parameter_validation_errors(
    stripe_client: stripe.StripeClient, params: dict[str, Any], code: str, param: str
) -> None:
    """Unknown, ill-typed, missing, exclusive and empty parameters get Stripe's 400 and code."""
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.prices.create(params)  # type: ignore[arg-type]
    assert caught.value.http_status == 400
    assert caught.value.code == code
    assert caught.value.param == param


def test_enum_values_are_checked(stripe_client: stripe.StripeClient) -> None:
    """A value outside an enum is refused naming the parameter."""
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.prices.create(
            cast(
                Any,
                {
                    "currency": "usd",
                    "unit_amount": 1,
                    "product_data": {"name": "p"},
                    "recurring": {"interval": "fortnight"},
                },
            )
        )
    assert caught.value.param == "recurring[interval]"


def test_product_and_price_with_lookup_key(stripe_client: stripe.StripeClient) -> None:
    """Prices are found by lookup key; a second price cannot take a used key unless transferred."""
    product = stripe_client.v1.products.create({"name": "Growth"})
    growth = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount": 2500,
            "recurring": {"interval": "month"},
            "lookup_key": "growth_monthly",
        }
    )
    stripe_client.v1.prices.create(
        {"currency": "usd", "product": product.id, "unit_amount": 1, "lookup_key": "other"}
    )
    found = stripe_client.v1.prices.list({"lookup_keys": ["growth_monthly"]})
    assert [p.id for p in found.data] == [growth.id]
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.prices.create(
            {"currency": "usd", "product": product.id, "unit_amount": 3, "lookup_key": "growth_monthly"}
        )
    assert caught.value.param == "lookup_key"
    moved = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount": 3,
            "lookup_key": "growth_monthly",
            "transfer_lookup_key": True,
        }
    )
    assert stripe_client.v1.prices.list({"lookup_keys": ["growth_monthly"]}).data[0].id == moved.id


def test_tiered_price_shows_tiers_only_when_expanded(stripe_client: stripe.StripeClient) -> None:
    """Like Stripe, `tiers` is returned only with `expand[]=tiers`."""
    meter = make_meter(stripe_client)
    price = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "product_data": {"name": "Standard"},
            "billing_scheme": "tiered",
            "tiers_mode": "graduated",
            "tiers": STANDARD_TIERS,  # type: ignore[typeddict-item]
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
        }
    )
    assert "tiers" not in price
    expanded = stripe_client.v1.prices.retrieve(price.id, {"expand": ["tiers"]})
    tiers = expanded.tiers
    assert tiers is not None
    assert [t.up_to for t in tiers] == [10000, None]
    assert tiers[1].unit_amount == 10


def test_unit_amount_decimal_is_kept_exact(stripe_client: stripe.StripeClient) -> None:
    """`unit_amount_decimal` is stored as given, with no whole `unit_amount` when fractional."""
    price = stripe_client.v1.prices.create(
        {"currency": "usd", "product_data": {"name": "p"}, "unit_amount_decimal": Decimal("0.75")}
    )
    assert price.unit_amount_decimal == Decimal("0.75")
    assert price.unit_amount is None


def test_metered_price_without_meter_needs_legacy_version(stripe_client: stripe.StripeClient) -> None:
    """Since basil a metered price needs a meter; an older Stripe-Version may still create one."""
    params: Any = {
        "currency": "usd",
        "product_data": {"name": "p"},
        "unit_amount": 1,
        "recurring": {"interval": "month", "usage_type": "metered"},
    }
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.prices.create(params)
    assert caught.value.param == "recurring[meter]"
    legacy_params: Any = {**params, "recurring": {**params["recurring"], "aggregate_usage": "sum"}}
    legacy = stripe_client.v1.prices.create(
        legacy_params,
        {"stripe_version": LEGACY},
    )
    assert legacy["recurring"]["aggregate_usage"] == "sum"


def test_aggregate_usage_is_unknown_on_current_versions(stripe_client: stripe.StripeClient) -> None:
    """`aggregate_usage` was removed in basil, so current versions call it an unknown parameter."""
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.prices.create(
            cast(
                Any,
                {
                    "currency": "usd",
                    "product_data": {"name": "p"},
                    "unit_amount": 1,
                    "recurring": {"interval": "month", "usage_type": "metered", "aggregate_usage": "sum"},
                },
            )
        )
    assert caught.value.code == "parameter_unknown"
    assert caught.value.param == "recurring[aggregate_usage]"


def test_meters_create_list_retrieve_deactivate(stripe_client: stripe.StripeClient) -> None:
    """Meters default their mappings, list by status and can be deactivated and reactivated."""
    meter_id = make_meter(stripe_client)
    meter = stripe_client.v1.billing.meters.retrieve(meter_id)
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.value_settings.event_payload_key == "value"
    with pytest.raises(stripe.InvalidRequestError):
        make_meter(stripe_client)  # same event_name while active
    stripe_client.v1.billing.meters.deactivate(meter_id)
    assert stripe_client.v1.billing.meters.list({"status": "active"}).data == []
    assert stripe_client.v1.billing.meters.list({"status": "inactive"}).data[0].id == meter_id
    assert stripe_client.v1.billing.meters.reactivate(meter_id).status == "active"


def test_subscription_has_periods_on_items_and_itself(stripe_client: stripe.StripeClient) -> None:
    """Current period start/end appear on the subscription and on each item, one month apart."""
    m = subscribe(stripe_client)
    sub = stripe_client.v1.subscriptions.retrieve(m.subscription)
    assert sub.status == "active"
    assert sub["current_period_start"] == m.period_start
    assert sub["current_period_end"] == m.period_end
    assert 28 * 86400 <= m.period_end - m.period_start <= 31 * 86400


def test_metered_item_refuses_quantity(stripe_client: stripe.StripeClient) -> None:
    """A metered price cannot take a quantity on a subscription."""
    m = subscribe(stripe_client)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.subscriptions.create(
            {"customer": m.customer, "items": [{"price": m.price, "quantity": 3}]}
        )
    assert caught.value.param == "items[0][quantity]"


def test_cancel_subscription(stripe_client: stripe.StripeClient) -> None:
    """Canceling sets status canceled and hides it from the default list."""
    m = subscribe(stripe_client)
    canceled = stripe_client.v1.subscriptions.cancel(m.subscription)
    assert canceled.status == "canceled"
    assert canceled.canceled_at is not None
    assert stripe_client.v1.subscriptions.list({"customer": m.customer}).data == []
    listed = stripe_client.v1.subscriptions.list({"customer": m.customer, "status": "canceled"})
    assert [s.id for s in listed.data] == [m.subscription]


def test_subscription_items_create_list_delete(stripe_client: stripe.StripeClient) -> None:
    """Items can be added and deleted; the last item cannot be deleted."""
    m = subscribe(stripe_client)
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.subscription_items.delete(m.item)
    licensed = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "product_data": {"name": "seat"},
            "unit_amount": 100,
            "recurring": {"interval": "month"},
        }
    )
    added = stripe_client.v1.subscription_items.create(
        {"subscription": m.subscription, "price": licensed.id, "quantity": 2}
    )
    listed = stripe_client.v1.subscription_items.list({"subscription": m.subscription})
    assert {i.id for i in listed.data} == {m.item, added.id}
    assert stripe_client.v1.subscription_items.delete(added.id).deleted is True
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.subscription_items.retrieve(added.id)
    assert caught.value.code == "resource_missing"


def test_list_pagination(stripe_client: stripe.StripeClient) -> None:
    """Lists are newest first and page with `limit` and `starting_after`."""
    ids = [stripe_client.v1.customers.create({}).id for _ in range(3)]
    first = stripe_client.v1.customers.list({"limit": 2})
    assert [c.id for c in first.data] == ids[::-1][:2]
    assert first.has_more
    rest = stripe_client.v1.customers.list({"limit": 2, "starting_after": first.data[-1].id})
    assert [c.id for c in rest.data] == [ids[0]]
    assert not rest.has_more


@pytest.mark.anyio
async def test_async_client_works(stripe_emulator: StripeEmulator) -> None:
    """The SDK's async methods reach the emulator too."""
    client = stripe_emulator.client()
    customer = await client.v1.customers.create_async({"email": "async@example.com"})
    fetched = await client.v1.customers.retrieve_async(customer.id)
    assert fetched.email == "async@example.com"


def test_remaining_catalog_operations(stripe_client: stripe.StripeClient) -> None:
    """Products, prices, meters, customers and test clocks update, list and delete like Stripe."""
    product = stripe_client.v1.products.create({"name": "Old"})
    assert stripe_client.v1.products.update(product.id, {"name": "New"}).name == "New"
    assert [p.id for p in stripe_client.v1.products.list({"active": True}).data] == [product.id]
    price = stripe_client.v1.prices.create({"currency": "usd", "product": product.id, "unit_amount": 1})
    assert stripe_client.v1.prices.update(price.id, {"active": False}).active is False
    assert stripe_client.v1.prices.list({"active": True}).data == []
    meter_id = make_meter(stripe_client)
    assert stripe_client.v1.billing.meters.update(meter_id, {"display_name": "Calls"}).display_name == "Calls"
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": 1_700_000_000})
    assert [c.id for c in stripe_client.v1.test_helpers.test_clocks.list().data] == [clock.id]
    assert stripe_client.v1.test_helpers.test_clocks.delete(clock.id).deleted is True
    customer = stripe_client.v1.customers.create({})
    assert stripe_client.v1.customers.delete(customer.id).deleted is True
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.customers.retrieve(customer.id)


def test_licensed_item_quantity_update(stripe_client: stripe.StripeClient) -> None:
    """A licensed item's quantity can change; a metered item refuses one."""
    m = subscribe(stripe_client, extra_licensed=True)
    items = stripe_client.v1.subscription_items.list({"subscription": m.subscription}).data
    licensed = next(i for i in items if i.id != m.item)
    assert stripe_client.v1.subscription_items.update(licensed.id, {"quantity": 3}).quantity == 3
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.subscription_items.update(m.item, {"quantity": 3})
    assert caught.value.param == "quantity"


def test_clients_survive_reset(stripe_emulator: StripeEmulator) -> None:
    """A client from `client()` keeps working after `reset()` wiped the account."""
    client = stripe_emulator.client()
    first = client.v1.customers.create({})
    stripe_emulator.reset()
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.retrieve(first.id)
    assert client.v1.customers.create({}).id != first.id


@pytest.mark.anyio
async def test_keepalive_async_client(stripe_emulator: StripeEmulator) -> None:
    """With `keepalive=True` async requests share connections until `aclose()`."""
    http_client = EmulatorHTTPXClient(keepalive=True)
    client = stripe_emulator.client(http_client=http_client)
    try:
        for _ in range(3):
            await client.v1.customers.create_async({})
    finally:
        await http_client.aclose()
        http_client.close()
    assert len(stripe_emulator.requests("customers.create")) == 3
