"""Settings for the middleware, read once from the environment (or given in code) and validated loudly."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypedDict, Unpack

from metered_middleware._errors import ConfigurationError
from metered_middleware._parse import (
    check_store,
    parse_bool,
    parse_choice,
    parse_int,
    parse_list,
    parse_seconds,
    read_store,
    taker,
)

__all__ = ["DEFAULT_EXCLUDE_PATHS", "RouteWeight", "Settings", "SettingsOverrides", "parse_statuses"]

DEFAULT_EXCLUDE_PATHS: Final = (
    "/health",
    "/health/*",
    "/healthz",
    "/livez",
    "/readyz",
    "/ping",
    "/docs",
    "/docs/*",
    "/redoc",
    "/redoc/*",
    "/openapi.json",
    "/favicon.ico",
)
_HEADER_RE: Final = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"})


@dataclass(frozen=True, slots=True)
class RouteWeight:
    """Units a matching request counts: ``method`` (or ``*``) and a glob ``pattern`` on the path."""

    method: str
    pattern: str
    weight: int


def parse_statuses(name: str, raw: str) -> frozenset[int]:
    """Parse ``2xx,3xx``, ``200-299`` or ``201,204`` into the set of statuses that count."""
    allowed = "comma-separated classes (2xx), ranges (200-299) or codes (204) between 100 and 599"
    statuses: set[int] = set()
    for part in parse_list(raw):
        token = part.lower()
        if re.fullmatch(r"[1-5]xx", token):
            base = int(token[0]) * 100
            statuses.update(range(base, base + 100))
        elif m := re.fullmatch(r"(\d{3})-(\d{3})", token):
            low, high = int(m[1]), int(m[2])
            if not 100 <= low <= high <= 599:
                raise ConfigurationError(name, raw, allowed)
            statuses.update(range(low, high + 1))
        elif re.fullmatch(r"\d{3}", token) and 100 <= int(token) <= 599:
            statuses.add(int(token))
        else:
            raise ConfigurationError(name, raw, allowed)
    if not statuses:
        raise ConfigurationError(name, raw, allowed)
    return frozenset(statuses)


def _parse_weights(name: str, raw: str) -> tuple[RouteWeight, ...]:
    allowed = "rules like 'GET /v1/fonts/*/subset=5' or '/v1/export/*=10', separated by ',' or ';'"
    rules: list[RouteWeight] = []
    for part in parse_list(raw):
        target, sep, weight_text = part.rpartition("=")
        if not sep:
            raise ConfigurationError(name, raw, allowed)
        pieces = target.split()
        if len(pieces) == 1:
            method, pattern = "*", pieces[0]
        elif len(pieces) == 2:
            method, pattern = pieces[0].upper(), pieces[1]
        else:
            raise ConfigurationError(name, raw, allowed)
        if method not in _METHODS or not pattern.startswith("/"):
            raise ConfigurationError(name, raw, allowed)
        try:
            weight = int(weight_text)
        except ValueError:
            raise ConfigurationError(name, raw, allowed) from None
        if not 0 <= weight <= 1_000_000:
            raise ConfigurationError(name, raw, "weights are integers from 0 to 1000000")
        rules.append(RouteWeight(method, pattern, weight))
    return tuple(rules)


def _check_header(name: str, value: str) -> str:
    if not _HEADER_RE.fullmatch(value):
        raise ConfigurationError(name, value, "HTTP header names: letters, digits and '-'")
    return value.lower()


class SettingsOverrides(TypedDict, total=False):
    """Keyword overrides of ``Settings`` fields, typed so a misspelt or ill-typed one fails type checks."""

    redis_url: str
    namespace: str
    shards: int
    key_headers: tuple[str, ...]
    key_bearer: bool
    key_query_param: str | None
    max_key_length: int
    exclude_paths: tuple[str, ...]
    count_statuses: frozenset[int]
    route_weights: tuple[RouteWeight, ...]
    fail_mode: Literal["open", "closed"]
    cache_ttl: float
    negative_cache_ttl: float
    coalesce_window: float
    buffer_max_targets: int
    retry_after: int
    key_pepper: str | None
    key_prefix: str
    resolver_kind: Literal["redis", "static"]
    static_keys: str | None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the middleware and the key registry need. Build with ``Settings.from_env()`` or keywords.

    Every field has a ``METERED_*`` variable (see the README's table); keyword
    arguments are validated the same way as the environment.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "mm"
    shards: int = 4
    key_headers: tuple[str, ...] = ("x-api-key",)
    key_bearer: bool = True
    key_query_param: str | None = None
    max_key_length: int = 256
    exclude_paths: tuple[str, ...] = DEFAULT_EXCLUDE_PATHS
    count_statuses: frozenset[int] = field(default_factory=lambda: frozenset(range(200, 400)))
    route_weights: tuple[RouteWeight, ...] = ()
    fail_mode: Literal["open", "closed"] = "open"
    cache_ttl: float = 60.0
    negative_cache_ttl: float = 5.0
    coalesce_window: float = 0.05
    buffer_max_targets: int = 100_000
    retry_after: int = 5
    key_pepper: str | None = None
    key_prefix: str = "mk_"
    resolver_kind: Literal["redis", "static"] = "redis"
    static_keys: str | None = None

    def __post_init__(self) -> None:
        check_store(self.redis_url, self.namespace, self.shards)
        object.__setattr__(
            self,
            "key_headers",
            tuple(_check_header("METERED_KEY_HEADERS", h) for h in self.key_headers),
        )
        if not self.key_headers and not self.key_bearer and not self.key_query_param:
            raise ConfigurationError(
                "METERED_KEY_HEADERS",
                "",
                "at least one place to read the key: a header, the Bearer token or a query parameter",
            )
        if self.fail_mode not in ("open", "closed"):
            raise ConfigurationError("METERED_FAIL_MODE", self.fail_mode, "'open' or 'closed'")
        if self.resolver_kind not in ("redis", "static"):
            raise ConfigurationError("METERED_RESOLVER", self.resolver_kind, "'redis' or 'static'")
        if self.resolver_kind == "static" and not self.static_keys:
            raise ConfigurationError(
                "METERED_STATIC_KEYS",
                self.static_keys,
                "a JSON object (or @path to a JSON file) when METERED_RESOLVER=static",
            )
        for name, value, low, high in (
            ("METERED_CACHE_TTL", self.cache_ttl, 0.0, 86_400.0),
            ("METERED_NEGATIVE_CACHE_TTL", self.negative_cache_ttl, 0.0, 3_600.0),
            ("METERED_COALESCE_WINDOW", self.coalesce_window, 0.0, 1.0),
        ):
            if not low <= value <= high:
                raise ConfigurationError(name, value, f"seconds from {low} to {high}")
        if not 16 <= self.max_key_length <= 4096:
            raise ConfigurationError("METERED_MAX_KEY_LENGTH", self.max_key_length, "16 to 4096")
        if not 1 <= self.buffer_max_targets <= 10_000_000:
            raise ConfigurationError("METERED_BUFFER_MAX_TARGETS", self.buffer_max_targets, "1 to 10000000")
        if not re.fullmatch(r"[A-Za-z0-9_]{0,16}", self.key_prefix):
            raise ConfigurationError("METERED_KEY_PREFIX", self.key_prefix, "up to 16 letters, digits or '_'")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Unpack[SettingsOverrides]
    ) -> Settings:
        """Read every ``METERED_*`` variable (``REDIS_URL`` as a fallback); keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        read_store(env, values)
        take = taker(env, values)
        take(
            "METERED_KEY_HEADERS",
            "key_headers",
            lambda n, r: tuple(_check_header(n, h) for h in parse_list(r)),
        )
        take("METERED_KEY_BEARER", "key_bearer", parse_bool)
        take("METERED_KEY_QUERY_PARAM", "key_query_param", lambda _n, r: r.strip())
        take("METERED_MAX_KEY_LENGTH", "max_key_length", lambda n, r: parse_int(n, r, 16, 4096))
        take("METERED_EXCLUDE_PATHS", "exclude_paths", lambda _n, r: parse_list(r))
        take("METERED_COUNT_STATUSES", "count_statuses", parse_statuses)
        take("METERED_ROUTE_WEIGHTS", "route_weights", _parse_weights)
        take("METERED_FAIL_MODE", "fail_mode", parse_choice(("open", "closed")))
        take("METERED_CACHE_TTL", "cache_ttl", lambda n, r: parse_seconds(n, r, 0, 86_400))
        take(
            "METERED_NEGATIVE_CACHE_TTL",
            "negative_cache_ttl",
            lambda n, r: parse_seconds(n, r, 0, 3_600),
        )
        take("METERED_COALESCE_WINDOW", "coalesce_window", lambda n, r: parse_seconds(n, r, 0, 1))
        take(
            "METERED_BUFFER_MAX_TARGETS",
            "buffer_max_targets",
            lambda n, r: parse_int(n, r, 1, 10_000_000),
        )
        take("METERED_RETRY_AFTER", "retry_after", lambda n, r: parse_int(n, r, 1, 3600))
        take("METERED_KEY_PEPPER", "key_pepper", lambda _n, r: r)
        take("METERED_KEY_PREFIX", "key_prefix", lambda _n, r: r.strip())
        take("METERED_RESOLVER", "resolver_kind", parse_choice(("redis", "static")))
        take("METERED_STATIC_KEYS", "static_keys", lambda _n, r: r)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Unpack[SettingsOverrides]) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
