"""The ASGI app: routing, auth, rate limiting, faults, idempotency, validation, then the handler.

The order mirrors Stripe's: a 401 or a 429 happens before the idempotency layer, so neither is
stored or replayed; a validation error is not stored either; anything the handler answered is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from . import _invoices, _meters, _resources, _subscriptions, _usage
from ._common import Ctx, Route
from ._errors import (
    EmulatorError,
    api_error,
    idempotency_conflict,
    invalid,
    invalid_api_key,
    no_api_key,
    rate_limited,
    unrecognized_url,
)
from ._faults import Fault, Faults, TokenBucket
from ._idempotency import IdempotencyStore, Stored, fingerprint
from ._params import parse_form, validate
from ._state import RequestRecord, State

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROUTES: list[Route] = [
    *_resources.ROUTES,
    *_meters.ROUTES,
    *_subscriptions.ROUTES,
    *_invoices.ROUTES,
    *_usage.ROUTES,
]
_TIERED_OPS = ("prices.", "subscriptions.", "subscription_items.")
#: A timeout fault with no delay holds until the client gives up, but never longer than this.
MAX_HOLD = 60.0


class DropConnection(Exception):
    """Raised after the response started so uvicorn closes the socket mid-response."""


class _QuietDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DropConnection)


logging.getLogger("uvicorn.error").addFilter(_QuietDrops())


def match(method: str, path: str) -> tuple[Route, tuple[str, ...]] | None:
    for candidate in ROUTES:
        if candidate.method == method:
            found = candidate.pattern.match(path)
            if found:
                return candidate, found.groups()
    return None


def _strip_tiers(obj: Any) -> Any:
    # Stripe includes a price's tiers only when asked (`expand[]=tiers`).
    if isinstance(obj, dict):
        is_price = obj.get("object") == "price"
        return {k: _strip_tiers(v) for k, v in obj.items() if not (is_price and k == "tiers")}
    if isinstance(obj, list):
        return [_strip_tiers(v) for v in obj]
    return obj


class EmulatorApp:
    """The emulator as a plain ASGI callable; `StripeEmulator` serves it with uvicorn."""

    def __init__(self, state: State, faults: Faults, bucket: TokenBucket) -> None:
        self.state = state
        self.faults = faults
        self.bucket = bucket
        self.idempotency = IdempotencyStore()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        request_id = "req_" + secrets.token_hex(7)
        version = headers.get("stripe-version")
        key = headers.get("idempotency-key")
        found = match(method, path)
        operation = found[0].operation if found else "unknown"
        record = RequestRecord(operation, method, path, {}, key, version)
        record.http_library = _http_library(headers.get("x-stripe-client-user-agent"))
        extra: dict[str, str] = {"Request-Id": request_id}
        if version:
            extra["Stripe-Version"] = version
        if key:
            extra["Idempotency-Key"] = key
        try:
            status, body, more = await self._handle(scope, receive, headers, found, request_id, record)
            extra.update(more)
        except EmulatorError as exc:
            status, body = exc.status, json.dumps(exc.body()).encode()
            extra.update(exc.headers)
            record.error_code = exc.code or exc.type
        except DropConnection:
            record.status = 0
            with self.state.lock:
                self.state.log.append(record)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
                }
            )
            raise
        record.status = status
        with self.state.lock:
            self.state.log.append(record)
        response_headers = [(b"content-type", b"application/json")]
        response_headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[str, str],
        found: tuple[Route, tuple[str, ...]] | None,
        request_id: str,
        record: RequestRecord,
    ) -> tuple[int, bytes, dict[str, str]]:
        method, path = scope["method"], scope["path"]
        token = self._authenticate(headers, found)
        if found is None:
            raise unrecognized_url(method, path)
        route, ids = found
        if not self.bucket.allow():
            raise rate_limited()
        body = await _read_body(receive)
        params = _parse(route, scope, headers, body)
        record.params = params
        delay = self.faults.latency(route.operation)
        if delay > 0:
            await asyncio.sleep(delay)
        fault = self.faults.take(route.operation)
        if fault is not None:
            record.fault = fault.kind
            await self._pre_commit_fault(fault, receive)
        ctx = Ctx(self.state, headers.get("stripe-version"), request_id, token)
        if route.legacy_only and not ctx.legacy:
            raise unrecognized_url(method, path)
        key = headers.get("idempotency-key") if method == "POST" else None
        status, payload, extra = self._execute(route, ids, ctx, params, key, record)
        if fault is not None and fault.commits:
            if fault.kind == "commit_then_drop":
                raise DropConnection
            raise api_error(500)
        return status, payload, extra

    def _authenticate(self, headers: dict[str, str], found: tuple[Route, tuple[str, ...]] | None) -> str:
        auth = headers.get("authorization", "")
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise no_api_key()
        credential = credential.strip()
        if found is not None and found[0].operation == "meter_event_stream.create":
            with self.state.lock:
                _usage.check_session(self.state, credential)
            return credential
        if not credential.startswith("sk_test_") or len(credential) <= len("sk_test_"):
            raise invalid_api_key(credential)
        return credential

    async def _pre_commit_fault(self, fault: Fault, receive: Receive) -> None:
        if fault.kind == "429":
            raise rate_limited()
        if fault.kind in ("500", "503"):
            raise api_error(int(fault.kind))
        if fault.kind == "timeout":
            hold = fault.delay if fault.delay is not None else MAX_HOLD
            try:
                # Only a disconnect arrives once the body is read: the client gave up.
                message = await asyncio.wait_for(receive(), timeout=hold)
            except TimeoutError:
                return
            if message["type"] == "http.disconnect":
                raise DropConnection

    def _execute(
        self,
        route: Route,
        ids: tuple[str, ...],
        ctx: Ctx,
        params: dict[str, Any],
        key: str | None,
        record: RequestRecord,
    ) -> tuple[int, bytes, dict[str, str]]:
        state = self.state
        with state.lock:
            fp = ""
            if key is not None:
                fp = fingerprint(route.method, _path_of(route, ids), params)
                stored = self.idempotency.lookup(key, state.now())
                if stored is not None:
                    if stored.fingerprint != fp:
                        state.idempotency_conflicts += 1
                        raise idempotency_conflict(key)
                    record.replayed = True
                    replay = dict(stored.headers)
                    replay.update({"Idempotent-Replayed": "true", "Original-Request": stored.request_id})
                    return stored.status, stored.body, replay
            valid = validate(route.schema_for(ctx), params)
            ctx.expand = list(valid.get("expand") or [])
            try:
                result = route.handler(ctx, valid, ids)
                if route.operation.startswith(_TIERED_OPS) and not any(
                    e.endswith("tiers") for e in ctx.expand
                ):
                    result = _strip_tiers(result)
                status, body, extra = 200, json.dumps(result, default=str).encode(), {}
            except EmulatorError as exc:
                status, body, extra = exc.status, json.dumps(exc.body()).encode(), exc.headers
                record.error_code = exc.code or exc.type
            if key is not None:
                self.idempotency.store(
                    key, Stored(fp, status, body, tuple(extra.items()), ctx.request_id, state.now())
                )
            return status, body, dict(extra)


def _path_of(route: Route, ids: tuple[str, ...]) -> str:
    return route.operation + "/" + "/".join(ids)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise DropConnection
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse(route: Route, scope: Scope, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    query = scope.get("query_string", b"").decode()
    pairs = parse_qsl(query, keep_blank_values=True)
    if route.v2:
        if not body.strip():
            return {}
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise invalid("The request body is not valid JSON.") from exc
        if not isinstance(parsed, dict):
            raise invalid("The request body must be a JSON object.")
        return parsed
    if body and "json" not in headers.get("content-type", ""):
        pairs += parse_qsl(body.decode(), keep_blank_values=True)
    return parse_form(pairs)


def _http_library(client_user_agent: str | None) -> str | None:
    """``httplib`` from the SDK's client user agent header (JSON), or None."""
    if not client_user_agent:
        return None
    try:
        found = json.loads(client_user_agent)
    except ValueError:
        return None
    library = found.get("httplib") if isinstance(found, dict) else None
    return library if isinstance(library, str) else None
