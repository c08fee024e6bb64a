"""The library's exception types. Callers never need to import redis or stripe errors to handle ours."""

from __future__ import annotations

__all__ = ["ConfigurationError", "LayoutMismatchError", "MeteringError", "StorageError"]


class MeteringError(Exception):
    """Base class of every error this library raises."""


class ConfigurationError(MeteringError, ValueError):
    """A setting is missing or has a value that is not allowed.

    The message names the variable (or keyword), the bad value and what is allowed.
    """

    def __init__(self, name: str, value: object, allowed: str) -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{name}={value!r} is not valid: {allowed}")


class StorageError(MeteringError):
    """Redis could not be reached or refused a command; the original error is the ``__cause__``."""


class LayoutMismatchError(ConfigurationError):
    """The shard count (or this version's bucket count) differs from the one recorded for the namespace.

    Counting or flushing a namespace under another layout would put new units where no flusher looks and
    leave the recorded shards' pending units to nobody, so it is refused. ``recorded`` and ``configured``
    are the two layouts (``{"shards": n, "buckets": n}``).
    """

    def __init__(
        self, namespace: str, record_key: str, recorded: dict[str, object], configured: dict[str, int]
    ) -> None:
        self.namespace = namespace
        self.record_key = record_key
        self.recorded = recorded
        self.configured = configured
        shards = recorded.get("shards")
        if recorded.get("buckets") != configured["buckets"] and shards == configured["shards"]:
            allowed = (
                f"namespace {namespace!r} splits each shard into {recorded.get('buckets')} buckets (recorded "
                f"in Redis at {record_key!r}), this version of metered-middleware into "
                f"{configured['buckets']}: run one version of it in every app and flusher"
            )
        else:
            allowed = (
                f"namespace {namespace!r} has counted in {shards} shards since it started (recorded in Redis "
                f"at {record_key!r}); counting or flushing it in {configured['shards']} would leave pending "
                f"usage where no flusher looks. Set METERED_SHARDS={shards}: a namespace's shard count "
                "cannot change once counting has started"
            )
        super().__init__("METERED_SHARDS", configured["shards"], allowed)
