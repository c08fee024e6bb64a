"""Lua scripts, kept as files beside the package and registered once per client."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["script_source"]


@cache
def script_source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return (files("metered_middleware") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
