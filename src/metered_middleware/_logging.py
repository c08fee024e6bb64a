"""Logging set-up for the CLI and for apps that want it: plain text or one JSON object a line.

The library only ever logs through ``logging.getLogger("metered_middleware...")``; it never configures
handlers itself (``configure_logging`` is for the CLI and for users who ask). Fields passed with
``extra={...}`` become JSON keys, so a delivery decision can be audited by shard, batch and target.
API keys are never logged by the library; ``KeyRedactingFilter`` is a safety net that rewrites anything
shaped like a key into a non-reversible reference before a record is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from metered_middleware._errors import ConfigurationError

__all__ = ["JsonFormatter", "KeyRedactingFilter", "configure_logging", "key_reference"]

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is worth emitting.
_STANDARD: Final = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "message", "asctime", "taskName"}
)
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def key_reference(key: str) -> str:
    """A short, non-reversible reference to a secret: ``key~<first 12 hex of its SHA-256>``."""
    return "key~" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyRedactingFilter(logging.Filter):
    """Replace API keys (``<prefix>`` and 16+ key characters) in messages and extras by a reference."""

    def __init__(self, prefix: str = "mk_") -> None:
        super().__init__()
        self._pattern = re.compile(re.escape(prefix) + r"[A-Za-z0-9_-]{16,}") if prefix else None

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str) and self._pattern is not None:
            return self._pattern.sub(lambda m: key_reference(m.group(0)), value)
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        if self._pattern is None:
            return True
        record.msg = self._scrub(str(record.msg)) if isinstance(record.msg, str) else record.msg
        if isinstance(record.args, tuple):
            record.args = tuple(self._scrub(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: self._scrub(v) for k, v in record.args.items()}
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD:
                setattr(record, name, self._scrub(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``message``, every ``extra`` field, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as JSON (values that are not JSON types are written with ``str``)."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure_logging(
    *,
    fmt: str | None = None,
    level: str | None = None,
    environ: Mapping[str, str] | None = None,
    stream: Any = None,
    key_prefix: str = "mk_",
) -> logging.Handler:
    """Send ``metered_middleware`` logs to ``stream`` (stderr) as ``text`` or ``json``.

    Defaults come from ``METERED_LOG_FORMAT`` (``text``) and ``METERED_LOG_LEVEL`` (``INFO``). Calling it
    again replaces the handler it installed before. Returns the handler.
    """
    env = os.environ if environ is None else environ
    chosen = (fmt or env.get("METERED_LOG_FORMAT") or "text").strip().lower()
    if chosen not in ("text", "json"):
        raise ConfigurationError("METERED_LOG_FORMAT", chosen, "'text' or 'json'")
    level_name = (level or env.get("METERED_LOG_LEVEL") or "INFO").strip().upper()
    if level_name not in logging.getLevelNamesMapping():
        raise ConfigurationError("METERED_LOG_LEVEL", level_name, "DEBUG, INFO, WARNING, ERROR or CRITICAL")
    logger = logging.getLogger("metered_middleware")
    for old in [h for h in logger.handlers if getattr(h, "_metered", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._metered = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(KeyRedactingFilter(key_prefix))
    logger.addHandler(handler)
    logger.setLevel(level_name)
    logger.propagate = False
    return handler
