"""Stripe-shaped API errors raised by the emulator's handlers and turned into responses by the app."""

from __future__ import annotations

from typing import Any

_DOCS = "https://stripe.com/docs/error-codes/"


class EmulatorError(Exception):
    """An error answered in Stripe's shape: `{"error": {"type", "code", "message", "param"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body Stripe sends for this error."""
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = _DOCS + self.code.replace("_", "-")
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def invalid(
    message: str, *, param: str | None = None, code: str | None = None, status: int = 400
) -> EmulatorError:
    """A 400 `invalid_request_error`, Stripe's answer to a request it understood but refuses."""
    return EmulatorError(status, message, code=code, param=param)


def missing(kind: str, object_id: str, *, param: str | None = None) -> EmulatorError:
    """Stripe's 404 `resource_missing` for an id that does not exist (or no longer does)."""
    return EmulatorError(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def parameter_unknown(param: str) -> EmulatorError:
    """Stripe's 400 for a parameter the operation does not take."""
    return invalid(f"Received unknown parameter: {param}", param=param, code="parameter_unknown")


def parameter_missing(param: str) -> EmulatorError:
    """Stripe's 400 for a required parameter left out."""
    return invalid(f"Missing required param: {param}.", param=param, code="parameter_missing")


def unrecognized_url(method: str, path: str) -> EmulatorError:
    """Stripe's 404 for a route it does not serve (also how removed endpoints answer)."""
    return EmulatorError(
        404,
        f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
        "or we can help at https://support.stripe.com/.",
    )


def no_api_key() -> EmulatorError:
    """Stripe's 401 when the request carries no key."""
    return EmulatorError(
        401,
        "You did not provide an API key. You need to provide your API key in the Authorization "
        "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
        "https://stripe.com/docs/api#authentication for details, or we can help at "
        "https://support.stripe.com/.",
    )


def invalid_api_key(key: str) -> EmulatorError:
    """Stripe's 401 for a key it does not know, shown redacted as Stripe does."""
    shown = key[:8] + "*" * max(len(key) - 12, 0) + key[-4:] if len(key) > 12 else key
    return EmulatorError(401, f"Invalid API Key provided: {shown}")


def rate_limited() -> EmulatorError:
    """Stripe's 429 `rate_limit`."""
    return EmulatorError(
        429,
        "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
        code="rate_limit",
    )


def api_error(status: int = 500) -> EmulatorError:
    """Stripe's 5xx `api_error`."""
    return EmulatorError(
        status,
        "An unknown error occurred. Please try again later."
        if status != 503
        else "The service is temporarily unavailable. Please try again later.",
        type="api_error",
    )


def idempotency_conflict(key: str) -> EmulatorError:
    """Stripe's 400 for an idempotency key reused with different parameters."""
    return EmulatorError(
        400,
        "Keys for idempotent requests can only be used with the same parameters they were first "
        f"used with. Try using a key other than '{key}' if you meant to execute a different "
        "request.",
        type="idempotency_error",
    )
