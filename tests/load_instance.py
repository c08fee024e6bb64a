"""One app instance under load, run as its own process by the scenario tests.

Usage: python -m tests.load_instance REDIS_URL CLIENTS REQUESTS  (keys on stdin, one a line)
Prints the number of 200 responses it got.
"""

from __future__ import annotations

import asyncio
import sys

import httpx

from metered_middleware import MeteringMiddleware
from tests.helpers import make_app


async def main(redis_url: str, clients: int, requests: int, keys: list[str]) -> int:
    metered = MeteringMiddleware(make_app(), redis_url=redis_url, environ={}, coalesce_window=0.02)
    ok = 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as http:

        async def client(n: int) -> None:
            nonlocal ok
            for i in range(requests):
                key = keys[(n + i) % len(keys)]
                r = await http.get("/v1/hello", headers={"X-API-Key": key})
                ok += r.status_code == 200

        await asyncio.gather(*(client(n) for n in range(clients)))
    await metered.aclose()
    await metered.redis.aclose()
    return ok


if __name__ == "__main__":
    url, n_clients, n_requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(asyncio.run(main(url, n_clients, n_requests, sys.stdin.read().split())))
