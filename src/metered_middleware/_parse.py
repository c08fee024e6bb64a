"""Parsing and checking environment values, shared by the middleware's and the flusher's settings.

Every failure is a ``ConfigurationError`` naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from metered_middleware._errors import ConfigurationError

__all__ = [
    "Take",
    "check_store",
    "parse_bool",
    "parse_choice",
    "parse_int",
    "parse_list",
    "parse_seconds",
    "read_store",
    "taker",
]

_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", "redis+cluster://")

Take = Callable[[str, str, Callable[[str, str], Any]], None]


def parse_bool(name: str, raw: str) -> bool:
    """true/false, 1/0, yes/no, on/off."""
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(name, raw, "a boolean: true/false, 1/0, yes/no or on/off")


def parse_int(name: str, raw: str, low: int, high: int) -> int:
    """An integer within [low, high]."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigurationError(name, raw, f"an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise ConfigurationError(name, raw, f"an integer from {low} to {high}")
    return value


def parse_seconds(name: str, raw: str, low: float, high: float) -> float:
    """A duration in seconds, or with a unit (``50ms``, ``2s``, ``5m``, ``1h``), within [low, high]."""
    text = raw.strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], factor
            break
    allowed = f"a duration in seconds (or with ms/s/m/h), from {low} to {high} s"
    try:
        value = float(text) * scale
    except ValueError:
        raise ConfigurationError(name, raw, allowed) from None
    if not low <= value <= high:  # NaN fails this too
        raise ConfigurationError(name, raw, allowed)
    return value


def parse_list(raw: str) -> tuple[str, ...]:
    """Items separated by commas, semicolons or newlines, blanks dropped."""
    return tuple(part.strip() for part in re.split(r"[,;\n]", raw) if part.strip())


def parse_choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    """A parser accepting one of ``choices`` (case-insensitive)."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigurationError(name, raw, " or ".join(repr(c) for c in choices))
        return value

    return parse


def taker(env: Mapping[str, str], values: dict[str, Any]) -> Take:
    """``take(var, attr, parse)``: parse a set, non-blank variable into ``values[attr]``."""

    def take(var: str, attr: str, parse: Callable[[str, str], Any]) -> None:
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            values[attr] = parse(var, raw)

    return take


def read_store(env: Mapping[str, str], values: dict[str, Any]) -> None:
    """Where the counts live, read the same way by every part: Redis URL, namespace, shard count."""
    redis_url = env.get("METERED_REDIS_URL") or env.get("REDIS_URL")
    if redis_url:
        values["redis_url"] = redis_url.strip()
    take = taker(env, values)
    take("METERED_NAMESPACE", "namespace", lambda _n, r: r.strip())
    take("METERED_SHARDS", "shards", lambda n, r: parse_int(n, r, 1, 1024))


def check_store(redis_url: str, namespace: str, shards: int) -> None:
    """Validate the store settings (also when given as keywords)."""
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise ConfigurationError("METERED_NAMESPACE", namespace, "1 to 32 letters, digits, '_', '.' or '-'")
    if not 1 <= shards <= 1024:
        raise ConfigurationError("METERED_SHARDS", shards, "an integer from 1 to 1024")
    if not redis_url.startswith(_REDIS_SCHEMES):
        raise ConfigurationError(
            "METERED_REDIS_URL",
            redis_url,
            "a URL starting with redis://, rediss://, unix:// or redis+cluster://",
        )
