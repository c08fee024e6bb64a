"""Small shared pieces for the tests: a Starlette app to meter, and Redis totals."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from metered_middleware._layout import Layout
from metered_middleware._store import CountStore, CountWrite
from metered_middleware._target import BillingTarget

Message = MutableMapping[str, Any]


async def hello(request: Request) -> Response:
    target = request.state.billing_target
    return JSONResponse({"customer": target.customer, "key_id": target.key_id})


async def status(request: Request) -> Response:
    return PlainTextResponse("x", status_code=int(request.path_params["code"]))


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def boom(request: Request) -> Response:
    raise RuntimeError("handler failure")


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text(await ws.receive_text())
    await ws.close()


def make_app() -> Starlette:
    """A small API: /v1/hello, /v1/status/{code}, /v1/fonts/{f}/subset, /healthz, /v1/ws."""
    return Starlette(
        routes=[
            Route("/v1/hello", hello),
            Route("/v1/status/{code:int}", status),
            Route("/v1/fonts/{family}/subset", hello),
            Route("/healthz", health),
            Route("/v1/boom", boom),
            WebSocketRoute("/v1/ws", echo),
        ]
    )


async def pending_totals(client: aioredis.Redis, layout: Layout) -> dict[str, int]:
    """Pending units per target id across all shards."""
    out: dict[str, int] = {}
    for shard in range(layout.shards):
        for name in layout.pending_keys(shard):
            for field, value in (await client.hgetall(name)).items():
                key = field.decode() if isinstance(field, bytes) else field
                out[key] = out.get(key, 0) + int(value)
    return out


async def websocket_session(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], messages: list[str]
) -> list[Message]:
    """Drive one websocket connection through an ASGI app; return what the app sent."""
    inbox: list[Message] = [{"type": "websocket.connect"}]
    inbox += [{"type": "websocket.receive", "text": m} for m in messages]
    inbox.append({"type": "websocket.disconnect", "code": 1000})
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "scheme": "ws",
        "server": ("t", 80),
        "client": ("c", 1),
        "subprotocols": [],
        "root_path": "",
    }
    await app(scope, receive, send)
    return sent


class Lifespan:
    """Run an ASGI app's lifespan protocol: ``async with Lifespan(app):`` is startup ... shutdown."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        assert message["type"] == "lifespan.startup.complete", message
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        message = await self._from_app.get()
        assert message["type"] == "lifespan.shutdown.complete", message
        assert self._task is not None
        await self._task


async def count_as_middleware(
    redis: aioredis.Redis, layout: Layout, writer: str, seq: int, lines: list[tuple[BillingTarget, int]]
) -> None:
    """Write counts the way the middleware's counter does: one idempotent (writer, seq) write per shard."""
    by_shard: dict[int, list[tuple[BillingTarget, int]]] = {}
    for target, units in lines:
        by_shard.setdefault(layout.shard_of(target.target_id), []).append((target, units))
    writes = [CountWrite(shard, writer, seq, group) for shard, group in by_shard.items()]
    results = await CountStore(redis, layout).apply(writes)
    assert all(r is True for r in results), results


def use_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the request path, the tally and the window's grouping and encoding on their Python twins."""
    from metered_middleware import _counter, _fastpath, _middleware, _store

    monkeypatch.setattr(_middleware, "FastPath", _fastpath.PyFastPath)
    monkeypatch.setattr(_counter, "Tally", _fastpath.PyTally)
    monkeypatch.setattr(_counter, "NATIVE", False)
    monkeypatch.setattr(_store, "NATIVE", False)
    monkeypatch.setattr(_store, "encode_lines", _fastpath.py_encode_lines)
