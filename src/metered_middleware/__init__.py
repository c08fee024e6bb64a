"""Meter every API request in Redis and bill it through Stripe, exactly once.

The public surface is what ``__all__`` lists; modules starting with ``_`` are private.

The delivery side (``Flusher``, ``flusher_lifespan``, ``reconcile``, the sinks) is imported on first use: it
brings the Stripe SDK, httpx and aiohttp, 18k objects on top of the 40k of a Starlette process with the
request path loaded, and every full collection walks the whole heap. A server whose flusher runs as its own
process (``metered-middleware flush``) then never loads them.
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING, Any

from metered_middleware._config import RouteWeight, Settings
from metered_middleware._counter import Counter, CounterStats
from metered_middleware._delivery import DeadLetter, DeliveryStore, LeaseLostError
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._errors import ConfigurationError, LayoutMismatchError, MeteringError, StorageError
from metered_middleware._inspect import ShardStatus, TargetUsage, read_shards, target_usage
from metered_middleware._keys import generate_key, hash_key
from metered_middleware._layout import Layout
from metered_middleware._logging import JsonFormatter, KeyRedactingFilter, configure_logging, key_reference
from metered_middleware._middleware import MeteringMiddleware
from metered_middleware._redis import connect
from metered_middleware._registry import IssuedKey, KeyRecord, KeyRegistry
from metered_middleware._resolver import CachingResolver, CallableResolver, Resolver, StaticResolver
from metered_middleware._store import CountStore
from metered_middleware._target import INACTIVE_STATUSES, BillingTarget
from metered_middleware._version import __version__

if TYPE_CHECKING:
    from metered_middleware._flusher import Flusher, FlushReport
    from metered_middleware._lifespan import flusher_lifespan
    from metered_middleware._reconcile import ReconcileLine, ReconcileReport, reconcile
    from metered_middleware._sinks import Outcome, SendLine, Sink

# Public name -> the private module that defines it, imported when the name is first read.
_LAZY = {
    "Flusher": "_flusher",
    "FlushReport": "_flusher",
    "flusher_lifespan": "_lifespan",
    "ReconcileLine": "_reconcile",
    "ReconcileReport": "_reconcile",
    "reconcile": "_reconcile",
    "Outcome": "_sinks",
    "SendLine": "_sinks",
    "Sink": "_sinks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next read is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "INACTIVE_STATUSES",
    "BillingTarget",
    "CachingResolver",
    "CallableResolver",
    "ConfigurationError",
    "CountStore",
    "Counter",
    "CounterStats",
    "DeadLetter",
    "DeliverySettings",
    "DeliveryStore",
    "FlushReport",
    "Flusher",
    "IssuedKey",
    "JsonFormatter",
    "KeyRecord",
    "KeyRedactingFilter",
    "KeyRegistry",
    "Layout",
    "LayoutMismatchError",
    "LeaseLostError",
    "MeteringError",
    "MeteringMiddleware",
    "Outcome",
    "ReconcileLine",
    "ReconcileReport",
    "Resolver",
    "RouteWeight",
    "SendLine",
    "Settings",
    "ShardStatus",
    "Sink",
    "StaticResolver",
    "StorageError",
    "TargetUsage",
    "__version__",
    "configure_logging",
    "connect",
    "flusher_lifespan",
    "generate_key",
    "hash_key",
    "key_reference",
    "read_shards",
    "reconcile",
    "target_usage",
]
