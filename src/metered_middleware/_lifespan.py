"""Run the flusher inside an ASGI app: a lifespan that starts it and, at shutdown, flushes one last time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._flusher import Flusher

__all__ = ["flusher_lifespan"]

Lifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def flusher_lifespan(
    settings: DeliverySettings | None = None,
    *,
    wraps: Lifespan | None = None,
    flusher: Callable[[DeliverySettings], Flusher] = Flusher,
) -> Lifespan:
    """A lifespan (``Starlette(lifespan=...)``) running a flusher beside the app.

    ``wraps`` is the app's own lifespan: it runs inside, and its state is passed through. At shutdown
    the flusher stops taking new work and flushes once more within ``shutdown_grace``; what is left
    stays in Redis.
    Settings default to ``DeliverySettings.from_env()``, read when the app starts.
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
        resolved = settings or DeliverySettings.from_env()
        async with flusher(resolved) as running, anyio.create_task_group() as tg:
            await tg.start(running.run)
            try:
                if wraps is None:
                    yield None
                else:
                    async with wraps(app) as state:
                        yield state
            finally:
                running.stop()

    return lifespan
