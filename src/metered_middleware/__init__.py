"""Meter every API request in Redis and bill it through Stripe, exactly once."""

from importlib.metadata import version as _version

__version__ = _version("metered-middleware")

__all__ = ["__version__"]
