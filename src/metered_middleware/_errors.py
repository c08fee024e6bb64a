"""The library's exception types. Callers never need to import redis or stripe errors to handle ours."""

from __future__ import annotations

__all__ = ["ConfigurationError", "MeteringError", "StorageError"]


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
