"""One app instance under load, run as its own process by the scenario tests.

Usage: python -m tests.load_instance REDIS_URL CLIENTS REQUESTS [WINDOW [hold]]  (keys on stdin, one a line)
Prints the number of 200 responses it got. With ``hold`` it then waits, without any shutdown, to be killed.
"""

from __future__ import annotations

import asyncio
import sys

import httpx

from metered_middleware import MeteringMiddleware
from tests.helpers import make_app


async def main(
    redis_url: str, clients: int, requests: int, keys: list[str], window: float = 0.02, hold: bool = False
) -> int:
    metered = MeteringMiddleware(make_app(), redis_url=redis_url, environ={}, coalesce_window=window)
    ok = 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metered), base_url="http://t") as http:

        async def client(n: int) -> None:
            nonlocal ok
            for i in range(requests):
                key = keys[(n + i) % len(keys)]
                r = await http.get("/v1/hello", headers={"X-API-Key": key})
                ok += r.status_code == 200

        await asyncio.gather(*(client(n) for n in range(clients)))
    if hold:
        print(ok, flush=True)
        await asyncio.Event().wait()  # until SIGKILL: no lifespan shutdown, no final write
    await metered.aclose()
    await metered.redis.aclose()
    return ok


if __name__ == "__main__":
    url, n_clients, n_requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    window = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
    hold = len(sys.argv) > 5 and sys.argv[5] == "hold"
    print(asyncio.run(main(url, n_clients, n_requests, sys.stdin.read().split(), window, hold)))
