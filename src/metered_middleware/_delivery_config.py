"""Settings of the flusher, read once from the environment (or given in code) and validated loudly."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from metered_middleware._errors import ConfigurationError
from metered_middleware._parse import check_store, parse_choice, parse_int, parse_seconds, read_store, taker

__all__ = [
    "HTTP_CLIENTS",
    "HTTP_CLIENT_CHOICES",
    "SINKS",
    "DeliverySettings",
    "HTTPClientName",
    "SinkName",
    "TransportName",
]

SINKS: Final = ("meter_events", "usage_records", "meter_event_stream")
SinkName = Literal["meter_events", "usage_records", "meter_event_stream"]
# The flusher's transports to Stripe, and what METERED_HTTP_CLIENT accepts: one of them, or "auto" (aiohttp
# where it can run, httpx elsewhere; ``_sinks.pick_transport``).
HTTP_CLIENTS: Final = ("httpx", "aiohttp")
TransportName = Literal["httpx", "aiohttp"]
HTTP_CLIENT_CHOICES: Final = ("auto", *HTTP_CLIENTS)
HTTPClientName = Literal["auto", "httpx", "aiohttp"]
_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_KEY_RE: Final = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9_]+$")
_VERSION_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
# Stripe's documented request budgets: 25/s in test mode and 100/s live, with headroom for other callers.
TEST_RATE: Final = 20.0
LIVE_RATE: Final = 80.0


def _rate(name: str, raw: str) -> float | None:
    text = raw.strip().lower()
    if text == "auto":
        return None
    if text in {"off", "none", "0"}:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 10_000:
        raise ConfigurationError(name, raw, "requests per second from 0 to 10000, 'off' or 'auto'")
    return value


def _url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ConfigurationError(name, raw, "an http:// or https:// URL")
    return value


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """Everything the flusher needs. Build with ``DeliverySettings.from_env()`` or keywords.

    ``rate_limit`` is requests per second to Stripe: None picks Stripe's budget from the key (20/s for test
    keys, 80/s for live keys), 0 turns the limiter off.
    """

    stripe_api_key: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "mm"
    shards: int = 4
    sink: SinkName = "meter_events"
    meter_event_name: str | None = None
    flush_interval: float = 5.0
    api_base: str | None = None
    meter_events_base: str | None = None
    legacy_api_version: str = "2025-02-24.acacia"
    rate_limit: float | None = None
    max_concurrency: int = 8
    shutdown_grace: float = 10.0
    stale_after: float = 20 * 3600.0
    lease_ttl: float = 30.0
    batch_size: int = 500
    request_timeout: float = 30.0
    retry_attempts: int = 8
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    http_client: HTTPClientName = "auto"

    def __post_init__(self) -> None:
        if not _KEY_RE.fullmatch(self.stripe_api_key or ""):
            raise ConfigurationError(
                "STRIPE_API_KEY",
                _redact(self.stripe_api_key),
                "a secret key sk_test_…/sk_live_… (or rk_)",
            )
        check_store(self.redis_url, self.namespace, self.shards)
        if self.sink not in SINKS:
            raise ConfigurationError("METERED_SINK", self.sink, " or ".join(SINKS))
        if self.http_client not in HTTP_CLIENT_CHOICES:
            raise ConfigurationError(
                "METERED_HTTP_CLIENT", self.http_client, " or ".join(HTTP_CLIENT_CHOICES)
            )
        if self.http_client == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
            # A dependency of the package: missing only where it was uninstalled or the install is broken.
            raise ConfigurationError(
                "METERED_HTTP_CLIENT",
                self.http_client,
                "aiohttp is not installed: pip install 'metered-middleware[aiohttp]', or use httpx or auto",
            )
        if self.meter_event_name is not None and not re.fullmatch(
            r"[A-Za-z0-9_.:-]{1,100}", self.meter_event_name
        ):
            raise ConfigurationError(
                "METERED_METER_EVENT_NAME",
                self.meter_event_name,
                "1 to 100 letters, digits, '_.:-'",
            )
        if not _VERSION_RE.fullmatch(self.legacy_api_version) or self.legacy_api_version >= "2025-03-31":
            raise ConfigurationError(
                "METERED_LEGACY_API_VERSION",
                self.legacy_api_version,
                "an API version before 2025-03-31 (usage records end there), e.g. 2025-02-24.acacia",
            )
        if self.rate_limit is not None and not 0 <= self.rate_limit <= 10_000:
            raise ConfigurationError("METERED_RATE_LIMIT", self.rate_limit, "0 (off) to 10000 per second")
        for name, value, low, high in (
            ("METERED_FLUSH_INTERVAL", self.flush_interval, 0.01, 86_400.0),
            ("METERED_SHUTDOWN_GRACE", self.shutdown_grace, 0.0, 3_600.0),
            ("METERED_STALE_AFTER", self.stale_after, 1.0, 23 * 3600.0),
            ("METERED_LEASE_TTL", self.lease_ttl, 0.2, 3_600.0),
            ("METERED_STRIPE_TIMEOUT", self.request_timeout, 0.1, 600.0),
            ("METERED_RETRY_BACKOFF", self.retry_backoff, 0.0, 600.0),
            ("METERED_RETRY_BACKOFF_MAX", self.retry_backoff_max, 0.0, 3_600.0),
        ):
            if not low <= value <= high:
                raise ConfigurationError(name, value, f"seconds from {low} to {high}")
        for name, number, low_i, high_i in (
            ("METERED_MAX_CONCURRENCY", self.max_concurrency, 1, 1_000),
            ("METERED_FLUSH_BATCH_SIZE", self.batch_size, 1, 10_000),
            ("METERED_RETRY_ATTEMPTS", self.retry_attempts, 1, 1_000),
        ):
            if not low_i <= number <= high_i:
                raise ConfigurationError(name, number, f"an integer from {low_i} to {high_i}")

    @property
    def test_mode(self) -> bool:
        """Whether the key is a test-mode key (Stripe's lower rate budget applies)."""
        return "_test_" in self.stripe_api_key

    @property
    def effective_rate_limit(self) -> float | None:
        """Requests per second the limiter allows, or None when it is off."""
        if self.rate_limit is None:
            return TEST_RATE if self.test_mode else LIVE_RATE
        return self.rate_limit or None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> DeliverySettings:
        """Read ``STRIPE_API_KEY`` and ``METERED_*`` (``REDIS_URL`` as a fallback); keywords win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"stripe_api_key": env.get("STRIPE_API_KEY", "").strip()}

        read_store(env, values)
        take = taker(env, values)
        take("METERED_SINK", "sink", parse_choice(SINKS))
        take("METERED_HTTP_CLIENT", "http_client", parse_choice(HTTP_CLIENT_CHOICES))
        take("METERED_METER_EVENT_NAME", "meter_event_name", lambda _n, r: r.strip())
        take("METERED_FLUSH_INTERVAL", "flush_interval", lambda n, r: parse_seconds(n, r, 0.01, 86_400))
        take("METERED_STRIPE_API_BASE", "api_base", _url)
        take("METERED_STRIPE_METER_EVENTS_BASE", "meter_events_base", _url)
        take("METERED_LEGACY_API_VERSION", "legacy_api_version", lambda _n, r: r.strip())
        take("METERED_RATE_LIMIT", "rate_limit", _rate)
        take("METERED_MAX_CONCURRENCY", "max_concurrency", lambda n, r: parse_int(n, r, 1, 1_000))
        take("METERED_SHUTDOWN_GRACE", "shutdown_grace", lambda n, r: parse_seconds(n, r, 0, 3_600))
        take("METERED_STALE_AFTER", "stale_after", lambda n, r: parse_seconds(n, r, 1, 23 * 3600))
        take("METERED_LEASE_TTL", "lease_ttl", lambda n, r: parse_seconds(n, r, 0.2, 3_600))
        take("METERED_FLUSH_BATCH_SIZE", "batch_size", lambda n, r: parse_int(n, r, 1, 10_000))
        take("METERED_STRIPE_TIMEOUT", "request_timeout", lambda n, r: parse_seconds(n, r, 0.1, 600))
        take("METERED_RETRY_ATTEMPTS", "retry_attempts", lambda n, r: parse_int(n, r, 1, 1_000))
        take("METERED_RETRY_BACKOFF", "retry_backoff", lambda n, r: parse_seconds(n, r, 0, 600))
        take("METERED_RETRY_BACKOFF_MAX", "retry_backoff_max", lambda n, r: parse_seconds(n, r, 0, 3_600))
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> DeliverySettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _redact(key: str | None) -> str:
    if not key:
        return ""
    return key[:8] + "…" if len(key) > 12 else "…"
