"""The SDK's async HTTP client over aiohttp: the flusher's transport on asyncio (METERED_HTTP_CLIENT=auto).

A Stripe call through httpx costs the flusher 1.2-1.3 ms of CPU on this project's benchmark machine, even on
httpcore's pool with the asyncio network backend (h11's parsing and header checks, httpcore's models and
locks). aiohttp parses HTTP in C and costs 0.65-0.75 ms for the same call, which takes one flusher past
Stripe's 1,000 v1 calls a second (``benchmarks/flusher.py``), so ``auto`` picks it wherever it can run:
on asyncio, unless only ``ALL_PROXY`` is set (``_sinks.pick_transport``).

It is written like the httpx one: a documented ``stripe.HTTPClient`` subclass, every transport error (a
refused connection, a reset, a response lost after Stripe committed, a timeout) raised as the SDK's
``APIConnectionError`` so that the flusher resends the same request, which Stripe replays.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Mapping
from typing import Any, Final

import aiohttp
import anyio
import stripe

from metered_middleware._errors import ConfigurationError

__all__ = ["AIOHTTPClient", "routes_through"]

# aiohttp routes through an HTTP proxy (HTTP_PROXY, HTTPS_PROXY) but not ALL_PROXY, which httpx honours.
_UNSUPPORTED_PROXY: Final = "all"


def routes_through(proxies: Mapping[str, str]) -> bool:
    """Whether aiohttp can honour the proxies ``urllib.request.getproxies()`` found (not ALL_PROXY alone)."""
    return _UNSUPPORTED_PROXY not in proxies or "http" in proxies or "https" in proxies


class AIOHTTPClient(stripe.HTTPClient):
    """One keep-alive ``aiohttp.ClientSession`` for the flusher's requests, opened at the first request (it
    needs the running asyncio loop) and closed by ``close_async``."""

    name = "aiohttp"

    def __init__(self, timeout: float, concurrency: int | None = None) -> None:
        super().__init__()
        # Read once, as httpx does. aiohttp's own trust_env re-reads the environment and ~/.netrc on every
        # request: that was more than half of a v1 line's CPU (0.64-0.74 ms a line without it, 1.8 with it).
        proxies = urllib.request.getproxies()
        self._proxies = {scheme: url for scheme, url in proxies.items() if scheme in ("http", "https")}
        self._no_proxy: dict[str, bool] = {}
        if not routes_through(proxies):
            raise ConfigurationError(
                "METERED_HTTP_CLIENT",
                "aiohttp",
                "aiohttp does not route through ALL_PROXY; set HTTPS_PROXY, or use METERED_HTTP_CLIENT=httpx",
            )
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # Room for one more request than the flusher sends at once (the v2 stream's session call).
        self._limit = (concurrency or 1) + 1
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "METERED_HTTP_CLIENT", "aiohttp", "aiohttp runs on asyncio only; use httpx under trio"
            ) from None
        verify = ssl.create_default_context(cafile=stripe.ca_bundle_path)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit, ssl=verify),
            timeout=self._timeout,
        )
        return self._session

    def _proxy_for(self, url: str) -> str | None:
        """The proxy the environment names for ``url`` (NO_PROXY honoured), or None."""
        if not self._proxies:
            return None
        parts = urllib.parse.urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if proxy is None:
            return None
        host = parts.hostname or ""
        bypass = self._no_proxy.get(host)
        if bypass is None:
            bypass = self._no_proxy[host] = bool(urllib.request.proxy_bypass(host))
        return None if bypass else proxy

    def sleep_async(self, secs: float) -> Awaitable[None]:
        """The SDK's own retries sleep here (the flusher turns them off and retries itself)."""
        return anyio.sleep(secs)

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        """The body, status and headers Stripe answered."""
        session = self._session or self._open()
        try:
            async with session.request(
                method, url, headers=dict(headers), data=post_data, proxy=self._proxy_for(url)
            ) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = f"Unexpected error communicating with Stripe ({type(exc).__name__}: {exc})"
            raise stripe.APIConnectionError(message, should_retry=True) from exc  # type: ignore[no-untyped-call]
        return body, response.status, response.headers

    async def close_async(self) -> None:
        """Close the session and its connections (idempotent)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
