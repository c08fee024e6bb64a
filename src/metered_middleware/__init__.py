"""Meter every API request in Redis and bill it through Stripe, exactly once.

The public surface is what ``__all__`` lists; modules starting with ``_`` are private.
"""

from importlib.metadata import version as _version

from metered_middleware._config import RouteWeight, Settings
from metered_middleware._counter import Counter, CounterStats
from metered_middleware._delivery import DeadLetter, DeliveryStore, LeaseLostError
from metered_middleware._delivery_config import DeliverySettings
from metered_middleware._errors import ConfigurationError, LayoutMismatchError, MeteringError, StorageError
from metered_middleware._flusher import Flusher, FlushReport
from metered_middleware._inspect import ShardStatus, TargetUsage, read_shards, target_usage
from metered_middleware._keys import generate_key, hash_key
from metered_middleware._layout import Layout
from metered_middleware._lifespan import flusher_lifespan
from metered_middleware._logging import JsonFormatter, KeyRedactingFilter, configure_logging, key_reference
from metered_middleware._middleware import MeteringMiddleware
from metered_middleware._reconcile import ReconcileLine, ReconcileReport, reconcile
from metered_middleware._redis import connect
from metered_middleware._registry import IssuedKey, KeyRecord, KeyRegistry
from metered_middleware._resolver import CachingResolver, CallableResolver, Resolver, StaticResolver
from metered_middleware._sinks import Outcome, SendLine, Sink
from metered_middleware._store import CountStore
from metered_middleware._target import INACTIVE_STATUSES, BillingTarget

__version__ = _version("metered-middleware")

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
