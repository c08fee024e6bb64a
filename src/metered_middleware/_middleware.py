"""The pure ASGI middleware: find the key, resolve it, admit or reject, count when the status is known."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
from collections.abc import Callable, Mapping
from typing import Unpack

import redis.asyncio as aioredis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metered_middleware._config import Settings, SettingsOverrides
from metered_middleware._counter import Counter
from metered_middleware._errors import LayoutMismatchError, StorageError
from metered_middleware._fastpath import FastPath
from metered_middleware._keys import KeyError_, extract_key
from metered_middleware._layout import Layout
from metered_middleware._redis import connect
from metered_middleware._registry import KeyRegistry
from metered_middleware._resolver import CachingResolver, Resolver, StaticResolver
from metered_middleware._responses import Rejections
from metered_middleware._store import CountStore
from metered_middleware._target import BillingTarget

__all__ = ["MeteringMiddleware"]


log = logging.getLogger("metered_middleware")

# Close code for a refused websocket handshake: 1008 is "policy violation"; the reason carries our code.
_WS_POLICY = 1008


def _no_fast_path(scope: Scope, send: Send) -> Send | None:
    """The fast path where the settings rule it out (query-string keys, a zero window): never taken."""
    return None


def _glob_regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class MeteringMiddleware:
    """Meter every API request of an ASGI app.

    ``app.add_middleware(MeteringMiddleware)`` configures itself from ``METERED_*`` variables; keyword
    arguments (any ``Settings`` field) override them. ``resolver`` replaces the Redis key registry and
    ``redis`` supplies a client to share. The resolved ``BillingTarget`` is put in ``scope["state"]`` as
    ``billing_target`` (``request.state.billing_target`` in Starlette), so handlers know who is calling.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings | None = None,
        resolver: Resolver | None = None,
        redis: aioredis.Redis | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Unpack[SettingsOverrides],
    ) -> None:
        self.app = app
        if settings is None:
            settings = Settings.from_env(environ, **overrides)
        elif overrides:
            settings = settings.replace(**overrides)
        self.settings = settings
        self.redis = redis if redis is not None else connect(settings.redis_url)
        self.layout = Layout(settings.namespace, settings.shards)
        self.store = CountStore(self.redis, self.layout)
        self.counter = Counter(
            self.store,
            self.layout,
            window=settings.coalesce_window,
            max_targets=settings.buffer_max_targets,
        )
        if resolver is None:
            if settings.resolver_kind == "static":
                assert settings.static_keys is not None  # guaranteed by Settings validation
                resolver = StaticResolver.from_setting(settings.static_keys, pepper=settings.key_pepper)
            else:
                resolver = KeyRegistry(
                    self.redis,
                    namespace=settings.namespace,
                    pepper=settings.key_pepper,
                    key_prefix=settings.key_prefix,
                )
        self.resolver = CachingResolver(
            resolver, ttl=settings.cache_ttl, negative_ttl=settings.negative_cache_ttl
        )
        self.rejections = Rejections(settings.retry_after)
        # Refusals per error code, plain ints read by the metrics collector (no metrics library on this path).
        self.rejected: dict[str, int] = {}
        # Everything the request path consults is derived here, once.
        self._header_names = frozenset(h.encode("latin-1") for h in settings.key_headers)
        self._excluded = _glob_regex(settings.exclude_paths)
        self._excluded_paths: dict[str, bool] = {}
        self._weights = [
            (w.method, re.compile(fnmatch.translate(w.pattern)), w.weight) for w in settings.route_weights
        ]
        self._weight_cache: dict[tuple[str, str], int] = {}
        self._statuses = settings.count_statuses
        self._closed_mode = settings.fail_mode == "closed"
        self._immediate = settings.coalesce_window == 0
        # The fast path: keys from headers only (a query-string key takes the general path).
        fast_keys = settings.key_query_param is None and b"authorization" not in self._header_names
        # The resolver cache's table is read directly (the same object for the cache's life; never rebound).
        # With a zero window a count must be committed before the response: the general path does that.
        self._fast: Callable[[Scope, Send], Send | None] = (
            FastPath(
                entries=self.resolver._entries,
                names=tuple(self._header_names),
                bearer=settings.key_bearer,
                max_length=settings.max_key_length,
                add=self.counter.tally.add,
                statuses=self._statuses,
                counter=self.counter,
                closed=self._closed_mode,
                weigh=self._weigh_scope if self._weights else None,
                excluded=self._excluded_paths if self._excluded is not None else None,
            )
            if fast_keys and not self._immediate
            else _no_fast_path
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The common case, in one call: an HTTP request with one key in the Authorization header (Bearer)
        # or a key header, already cached and admissible. It comes back None for anything else (another
        # scope type, two key headers, no key, a key not cached, a refusal), which the general path judges.
        # Each Python operation here costs about a point of a busy server's throughput, hence one call.
        counted_send = self._fast(scope, send)
        if counted_send is None:
            await self._general(scope, receive, send)
            return
        await self.app(scope, receive, counted_send)

    async def _general(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)  # misses, refusals, query-string keys
        else:
            await self._other(scope, receive, send)

    def _is_excluded(self, path: str) -> bool:
        excluded = self._excluded_paths.get(path)
        if excluded is None:
            assert self._excluded is not None
            excluded = self._excluded.match(path) is not None
            if len(self._excluded_paths) >= 10_000:
                self._excluded_paths.clear()  # paths with ids in them: keep the cache bounded
            self._excluded_paths[path] = excluded
        return excluded

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- admission -----------------------------------------------------------------------------------------
    async def _admit(self, scope: Scope) -> BillingTarget | str | None:
        """The caller's target, an error code to refuse with, or None when the path is not metered.

        Refusals are counted here, where they are decided, for HTTP and websockets alike.
        """
        admitted = await self._decide(scope)
        if isinstance(admitted, str):
            self.rejected[admitted] = self.rejected.get(admitted, 0) + 1
        return admitted

    async def _decide(self, scope: Scope) -> BillingTarget | str | None:
        if self._excluded is not None and self._is_excluded(scope["path"]):
            return None
        settings = self.settings
        try:
            key = extract_key(
                scope["headers"],
                scope.get("query_string", b"") if settings.key_query_param else b"",
                header_names=self._header_names,
                bearer=settings.key_bearer,
                query_param=settings.key_query_param,
                max_length=settings.max_key_length,
            )
        except KeyError_ as exc:
            return exc.code
        fp, target, fresh = self.resolver.cached(key)
        if not fresh:
            try:
                target = await self.resolver.resolve_miss(key, fp)
            except StorageError as exc:
                # Name the failure by type only: a user resolver's own exception text could hold the key.
                log.warning("key resolution unavailable: %s", type(exc.__cause__ or exc).__name__)
                return "metering_unavailable"
        if target is None:
            return "api_key_invalid"
        if target.revoked:
            return "api_key_revoked"
        if not target.active:
            return "subscription_inactive"
        if self._closed_mode and not self.counter.healthy:
            return "metering_unavailable"
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["billing_target"] = target
        return target

    def _weigh_scope(self, scope: Scope) -> int:
        return self._weight(scope["method"], scope["path"])

    def _weight(self, method: str, path: str) -> int:
        if not self._weights:
            return 1
        cache_key = (method, path)
        weight = self._weight_cache.get(cache_key)
        if weight is None:
            weight = 1
            for rule_method, pattern, rule_weight in self._weights:
                if (rule_method in ("*", method)) and pattern.match(path):
                    weight = rule_weight
                    break
            if len(self._weight_cache) > 10_000:
                self._weight_cache.clear()  # paths with ids in them: keep the cache bounded
            self._weight_cache[cache_key] = weight
        return weight

    # -- HTTP ----------------------------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        admitted = await self._admit(scope)
        if admitted is None:
            await self.app(scope, receive, send)
            return
        if isinstance(admitted, str):
            await self.rejections.http(send, admitted)
            return
        await self._http_admitted(
            scope, receive, send, admitted, self._weight(scope["method"], scope["path"])
        )

    async def _http_admitted(
        self, scope: Scope, receive: Receive, send: Send, target: BillingTarget, weight: int
    ) -> None:
        if weight == 0:
            await self.app(scope, receive, send)
            return
        counter = self.counter
        statuses = self._statuses

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in statuses:
                generation = counter.add(target, weight)
                if self._immediate:
                    # The count is taken either way: a failed write stays buffered and is retried with its
                    # sequence number, so it lands exactly once. Refusing now could bill a refused request.
                    with contextlib.suppress(StorageError):
                        await counter.commit(generation)
            await send(message)

        await self.app(scope, receive, metered_send)

    # -- websockets: one count per accepted connection -----------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        admitted = await self._admit(scope)
        if admitted is None:
            await self.app(scope, receive, send)
            return
        if isinstance(admitted, str):
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": _WS_POLICY, "reason": admitted})
            return
        target = admitted
        weight = self._weight("GET", scope["path"])
        counter = self.counter

        async def metered_send(message: Message) -> None:
            if message["type"] == "websocket.accept" and weight:
                counter.add(target, weight)
            await send(message)

        await self.app(scope, receive, metered_send)

    # -- lifespan: passed through; startup fails on a layout mismatch; on shutdown, counts are written first -
    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] == "lifespan.startup":
            problem = await self._layout_problem()
            if problem is not None:
                # Fail the deployment, not its requests: the server exits before serving with the wrong
                # shard count (the count writes would refuse it anyway, and keep the units in memory).
                log.error("not starting: %s", problem)
                await send({"type": "lifespan.startup.failed", "message": problem})
                return
        replayed = False

        async def watched() -> Message:
            nonlocal replayed
            if replayed:
                message = await receive()
            else:
                message, replayed = first, True
            if message["type"] == "lifespan.shutdown":
                await self.aclose()
            return message

        await self.app(scope, watched, send)

    async def _layout_problem(self) -> str | None:
        """Why this app must not start (its shard count is not the namespace's), or None."""
        try:
            await self.store.guard.check()
        except LayoutMismatchError as exc:
            return str(exc)
        except StorageError as exc:
            # Redis down at startup is an outage like any other, not a reason to stay down: the first count
            # write checks again before writing anything.
            log.warning("could not check the namespace's layout at startup: %s", exc)
        return None

    async def flush(self) -> None:
        """Write every buffered count to Redis now (raises ``StorageError`` if Redis refuses)."""
        await self.counter.flush()

    async def aclose(self) -> None:
        """Write buffered counts and stop the background writer. Safe to call more than once."""
        await self.counter.aclose()
