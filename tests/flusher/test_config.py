"""Delivery settings from the environment, and how Stripe's answers are classified."""

from __future__ import annotations

import pytest
import stripe

from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._errors import ConfigurationError
from metered_middleware._sinks import classify


def test_defaults_pick_stripes_budget_from_the_key() -> None:
    """Test keys get 20/s, live keys 80/s, 'off' disables it; shared variables match the middleware."""
    test = DeliverySettings.from_env({"STRIPE_API_KEY": "sk_test_x"})
    live = DeliverySettings.from_env({"STRIPE_API_KEY": "sk_live_x", "METERED_RATE_LIMIT": "auto"})
    off = DeliverySettings.from_env({"STRIPE_API_KEY": "sk_test_x", "METERED_RATE_LIMIT": "off"})
    assert (test.effective_rate_limit, live.effective_rate_limit, off.effective_rate_limit) == (20, 80, None)
    assert (test.sink, test.namespace, test.shards, test.legacy_api_version) == (
        "meter_events",
        "mm",
        4,
        "2025-02-24.acacia",
    )
    env = {"STRIPE_API_KEY": "sk_test_x", "REDIS_URL": "redis://h:1/2", "METERED_STALE_AFTER": "10h"}
    assert DeliverySettings.from_env(env).redis_url == "redis://h:1/2"
    assert DeliverySettings.from_env(env).stale_after == 36_000


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STRIPE_API_KEY", "pk_test_x"),
        ("METERED_SINK", "webhooks"),
        ("METERED_LEGACY_API_VERSION", "2025-03-31.basil"),
        ("METERED_RATE_LIMIT", "fast"),
        ("METERED_MAX_CONCURRENCY", "0"),
        ("METERED_FLUSH_INTERVAL", "soon"),
        ("METERED_STALE_AFTER", "30h"),
        ("METERED_STRIPE_API_BASE", "localhost:12111"),
        ("METERED_SHARDS", "0"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_is_allowed(variable: str, value: str) -> None:
    """Every bad value raises ConfigurationError naming the variable."""
    env = {"STRIPE_API_KEY": "sk_test_x", variable: value}
    with pytest.raises(ConfigurationError) as info:
        DeliverySettings.from_env(env)
    assert info.value.name == variable
    assert info.value.allowed


def _error(cls: type[stripe.StripeError], status: int, body: dict[str, str], **headers: str) -> Exception:
    err = cls.__new__(cls)
    stripe.StripeError.__init__(err, "boom", None, status, {"error": body}, headers, body.get("code"))
    return err


def _connection_error() -> Exception:
    return stripe.APIConnectionError("timed out")  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (_error(stripe.RateLimitError, 429, {"code": "rate_limit"}), "retry"),
        (_error(stripe.APIError, 500, {"type": "api_error"}), "retry"),
        (_error(stripe.APIError, 503, {"type": "api_error"}), "retry"),
        (_connection_error(), "retry"),
        (
            _error(
                stripe.InvalidRequestError,
                400,
                {"code": "duplicate_meter_event", "param": "identifier"},
                **{"Stripe-Should-Retry": "false"},
            ),
            "delivered",
        ),
        (_error(stripe.InvalidRequestError, 400, {"param": "timestamp"}), "restamp"),
        (_error(stripe.InvalidRequestError, 404, {"code": "resource_missing"}), "dead"),
        (_error(stripe.InvalidRequestError, 409, {}, **{"Stripe-Should-Retry": "true"}), "retry"),
        (_error(stripe.IdempotencyError, 400, {"type": "idempotency_error"}), "dead"),
    ],
)
def test_stripe_answers_are_classified(error: Exception, kind: str) -> None:
    """Invariant 5: replay/duplicate acknowledge, transient errors retry, refusals dead-letter."""
    assert classify(error).kind == kind
