"""The JSON error responses the middleware answers with, rendered once at import."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

__all__ = ["ERRORS", "Rejections"]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_WWW_AUTH: Final = (b"www-authenticate", b'Bearer realm="api"')

# code -> (status, type, message, extra headers). Codes are stable: clients branch on them.
ERRORS: Final[dict[str, tuple[int, str, str, tuple[tuple[bytes, bytes], ...]]]] = {
    "api_key_missing": (
        401,
        "authentication_error",
        "No API key: send it as 'Authorization: Bearer <key>' or in the X-API-Key header.",
        (_WWW_AUTH,),
    ),
    "api_key_invalid": (401, "authentication_error", "The API key is not valid.", (_WWW_AUTH,)),
    "api_key_ambiguous": (
        401,
        "authentication_error",
        "More than one API key was sent; send exactly one.",
        (_WWW_AUTH,),
    ),
    "api_key_revoked": (
        401,
        "authentication_error",
        "The API key has been revoked.",
        (_WWW_AUTH,),
    ),
    "subscription_inactive": (
        402,
        "billing_error",
        "The subscription for this API key is not active.",
        (),
    ),
    "metering_unavailable": (
        503,
        "service_unavailable",
        "Metering is temporarily unavailable; retry shortly.",
        (),
    ),
}


def _render(code: str, retry_after: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    status, kind, message, extra = ERRORS[code]
    public_code = "api_key_invalid" if code == "api_key_ambiguous" else code
    body = json.dumps(
        {"error": {"type": kind, "code": public_code, "message": message}}, separators=(",", ":")
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *extra,
    ]
    if status == 503:
        headers.append((b"retry-after", str(retry_after).encode()))
    return status, headers, body


class Rejections:
    """Pre-rendered responses for one middleware's settings."""

    def __init__(self, retry_after: int) -> None:
        self._rendered = {code: _render(code, retry_after) for code in ERRORS}

    async def http(self, send: Send, code: str) -> None:
        """Answer an HTTP request with the error for ``code``."""
        status, headers, body = self._rendered[code]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def status(self, code: str) -> int:
        """The HTTP status of a code."""
        return self._rendered[code][0]
