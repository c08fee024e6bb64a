"""Stripe webhooks: verify the signature, issue a key when a Checkout completes, follow subscriptions.

A key is stored in the registry by its hash only. The plain key must still reach the customer once, on the
Checkout success page, which may load before or after the webhook arrives; so the webhook leaves it in a
short-lived reveal slot that the success page empties as it shows it (GETDEL): shown once, then gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
import stripe
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse

from metered_middleware import BillingTarget, KeyRegistry, StorageError

__all__ = ["DEFAULT_TOLERANCE", "Onboarding", "verify_event"]

log = logging.getLogger("examples.typographic")

# Stripe's libraries refuse signatures older than five minutes: a captured webhook cannot be replayed later.
DEFAULT_TOLERANCE: Final = 300
REVEAL_TTL: Final = 3600


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": "invalid_request_error", "code": code, "message": message}}, status
    )


def verify_event(
    payload: bytes, signature: str | None, secret: str, tolerance: int = DEFAULT_TOLERANCE
) -> stripe.Event | JSONResponse:
    """The verified event, or the 400 response to send: missing, bad or stale signatures change nothing."""
    if not signature:
        return _error(400, "signature_missing", "The Stripe-Signature header is required.")
    try:
        event: stripe.Event = stripe.Webhook.construct_event(payload, signature, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        # Covers a wrong secret, a tampered body and a timestamp outside the tolerance alike.
        return _error(400, "signature_invalid", str(exc.user_message or exc))
    except ValueError:
        return _error(400, "payload_invalid", "The body is not a Stripe event.")
    return event


def _get(obj: Any, name: str) -> Any:
    """A field of a Stripe object or plain dict (webhook payloads and API responses alike), or None."""
    if obj is None:
        return None
    try:
        return obj[name]
    except KeyError:
        return None


def _id(value: Any) -> str | None:
    """An id whether the field holds the id or the expanded object."""
    if value is None or isinstance(value, str):
        return value
    found = _get(value, "id")
    return None if found is None else str(found)


@dataclass(frozen=True, slots=True)
class _Period:
    item: str | None
    start: int | None
    end: int | None


def _period(subscription: Any) -> _Period:
    """The first item and its current period; periods moved from subscriptions to items in 2025-03-31."""
    items = _get(_get(subscription, "items"), "data") or []
    item = items[0] if items else None
    start = _get(item, "current_period_start") or _get(subscription, "current_period_start")
    end = _get(item, "current_period_end") or _get(subscription, "current_period_end")
    return _Period(_id(item), int(start) if start else None, int(end) if end else None)


class Onboarding:
    """Turns verified Stripe events into API keys and key status.

    ``on_change`` runs after a subscription's keys changed, so the app can drop its in-process cache of
    resolved keys and refuse a canceled customer at once rather than after the cache TTL.
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        registry: KeyRegistry,
        stripe_client: stripe.StripeClient,
        webhook_secret: str,
        namespace: str,
        meter_event_name: str | None,
        on_change: Callable[[], None] = lambda: None,
        tolerance: int = DEFAULT_TOLERANCE,
    ) -> None:
        self.redis = redis
        self.registry = registry
        self.stripe = stripe_client
        self.webhook_secret = webhook_secret
        self.namespace = namespace
        self.meter_event_name = meter_event_name
        self.on_change = on_change
        self.tolerance = tolerance

    def _reveal_key(self, session_id: str) -> str:
        return f"{self.namespace}:typographic:reveal:{session_id}"

    def _revealed_key(self, session_id: str) -> str:
        return f"{self.namespace}:typographic:revealed:{session_id}"

    def _done_key(self, session_id: str) -> str:
        return f"{self.namespace}:typographic:checkout:{session_id}"

    async def endpoint(self, request: Request) -> JSONResponse:
        """``POST /stripe/webhook``."""
        payload = await request.body()
        event = verify_event(
            payload, request.headers.get("stripe-signature"), self.webhook_secret, self.tolerance
        )
        if isinstance(event, JSONResponse):
            return event
        try:
            outcome = await self.handle(event)
        except (StorageError, RedisError, stripe.StripeError):
            # A 5xx makes Stripe redeliver the event later, so nothing is lost while Redis or Stripe is away.
            log.exception("webhook %s (%s) failed", event.id, event.type)
            return _error(503, "webhook_failed", "Could not process the event now; Stripe will retry.")
        return JSONResponse({"received": True, "outcome": outcome})

    async def handle(self, event: stripe.Event) -> str:
        """Apply one verified event; returns what was done (for logs and tests)."""
        obj: Any = event.data.object
        if event.type == "checkout.session.completed":
            return await self.checkout_completed(obj)
        if event.type in ("customer.subscription.updated", "customer.subscription.deleted"):
            status = "canceled" if event.type.endswith("deleted") else str(_get(obj, "status"))
            return await self.subscription_changed(obj, status)
        return "ignored"

    async def checkout_completed(self, session: Any) -> str:
        """Issue one key for the session's new subscription (a redelivered event issues none)."""
        session_id = str(_get(session, "id"))
        subscription_id = _id(_get(session, "subscription"))
        if _get(session, "mode") != "subscription" or not subscription_id:
            return "ignored"
        # Stripe delivers at least once: the marker makes a redelivery a no-op.
        if not await self.redis.set(self._done_key(session_id), "1", nx=True):
            return "duplicate"
        try:
            subscription = await self.stripe.v1.subscriptions.retrieve_async(subscription_id)
            period = _period(subscription)
            metadata = _get(session, "metadata") or {}
            target = BillingTarget(
                customer=str(_id(_get(session, "customer")) or _id(_get(subscription, "customer"))),
                subscription_item=period.item,
                subscription=subscription_id,
                meter_event_name=self.meter_event_name,
                status=str(_get(subscription, "status") or "active"),
                period_start=period.start,
                period_end=period.end,
                test_clock=_id(_get(subscription, "test_clock")),
                plan=_get(metadata, "typographic_plan"),
            )
            issued = await self.registry.create(target, label=f"checkout {session_id}")
            await self.redis.set(self._reveal_key(session_id), issued.key, ex=REVEAL_TTL)
        except BaseException:
            await self.redis.delete(self._done_key(session_id))  # let the redelivery try again
            raise
        log.info("issued %s for %s (%s)", issued.key_id, target.customer, target.plan)
        return "key_issued"

    async def subscription_changed(self, subscription: Any, status: str) -> str:
        """Copy the subscription's status and period onto its keys."""
        period = _period(subscription)
        updated = await self.registry.update_subscription(
            str(_get(subscription, "id")),
            status=status,
            period_start=period.start,
            period_end=period.end,
            subscription_item=period.item,
        )
        self.on_change()
        return f"keys_updated:{updated}"

    async def reveal(self, session_id: str) -> str | None:
        """The key issued for a Checkout session, the first time only."""
        value = await self.redis.getdel(self._reveal_key(session_id))
        if value is None:
            return None
        await self.redis.set(self._revealed_key(session_id), "1", ex=REVEAL_TTL)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def was_revealed(self, session_id: str) -> bool:
        """Whether the session's key was already shown (so waiting for it is pointless)."""
        return bool(await self.redis.exists(self._revealed_key(session_id)))
