"""Request parameters: Stripe's bracketed form encoding, and validation against small schemas.

Stripe refuses what it does not know (`parameter_unknown`) and what it cannot read
(`parameter_invalid_integer`, `parameter_missing`, ...); the emulator does the same so that what it
accepts, Stripe would accept too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ._errors import EmulatorError, invalid, parameter_missing, parameter_unknown

_INT = re.compile(r"-?\d+\Z")
_KEY_PART = re.compile(r"\[([^\[\]]*)\]")


def parse_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest `a[b][0]=x` pairs into dicts; arrays stay dicts keyed by index until a schema reads them."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        parts = [head, *_KEY_PART.findall("[" + rest)] if rest else [head]
        node = root
        for depth, part in enumerate(parts):
            name = part if part != "" else str(len(node))
            if depth == len(parts) - 1:
                node[name] = value
                break
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise invalid(f"Invalid value for {key}: mixes a value and a hash.", param=key)
            node = child
    return root


def _join(path: str, name: str) -> str:
    return f"{path}[{name}]" if path else name


class Field:
    """A schema node; `nullable` fields accept an empty string, which Stripe reads as "unset"."""

    nullable: bool = False

    def read(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def check(self, value: Any, path: str) -> Any:
        if value == "" and not isinstance(self, Map):
            if self.nullable:
                return None
            raise invalid(
                f"You passed an empty string for '{path}'. We assume empty values are an attempt "
                f"to unset a parameter; however '{path}' cannot be unset. You should remove "
                f"'{path}' from your request or supply a non-empty value.",
                param=path,
                code="parameter_invalid_empty",
            )
        return self.read(value, path)


class Str(Field):
    def __init__(self, max_length: int = 5000, *, nullable: bool = False) -> None:
        self.max_length = max_length
        self.nullable = nullable

    def read(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise invalid(f"Invalid string: {value!r}", param=path)
        if len(value) > self.max_length:
            raise invalid(
                f"Invalid string: {value[:20]}...; must be at most {self.max_length} characters",
                param=path,
            )
        return value


class Int(Field):
    def __init__(self, *, nullable: bool = False) -> None:
        self.nullable = nullable

    def read(self, value: Any, path: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.match(value):
            return int(value)
        raise invalid(f"Invalid integer: {value}", param=path, code="parameter_invalid_integer")


class Bool(Field):
    def read(self, value: Any, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return bool(value == "true")
        raise invalid(f"Invalid boolean: {value}", param=path)


class Dec(Field):
    """A decimal string such as `unit_amount_decimal`, kept exact as a `Decimal`."""

    def __init__(self, *, nullable: bool = False) -> None:
        self.nullable = nullable

    def read(self, value: Any, path: str) -> Decimal:
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            number = Decimal("NaN")
        if not number.is_finite() or isinstance(value, bool):
            raise invalid(f"Invalid decimal: {value}", param=path)
        return number


class Enum(Field):
    def __init__(self, *values: str, nullable: bool = False) -> None:
        self.values = values
        self.nullable = nullable

    def read(self, value: Any, path: str) -> str:
        if value not in self.values:
            allowed = ", ".join(self.values[:-1]) + f", or {self.values[-1]}"
            raise invalid(f"Invalid {path}: must be one of {allowed}", param=path)
        return str(value)


class IntOr(Field):
    """An integer or one keyword, like `up_to=inf` or `timestamp=now`."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword

    def read(self, value: Any, path: str) -> int | str:
        if value == self.keyword:
            return self.keyword
        return Int().read(value, path)


class Map(Field):
    """`metadata`-like string maps; an empty string clears them, as on Stripe."""

    def __init__(self, max_keys: int = 50) -> None:
        self.max_keys = max_keys

    def read(self, value: Any, path: str) -> dict[str, str]:
        if value == "":
            return {}
        if not isinstance(value, dict) or len(value) > self.max_keys:
            raise invalid(f"Invalid hash: {path}", param=path)
        return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}


class Arr(Field):
    def __init__(self, item: Field, max_items: int = 10_000) -> None:
        self.item = item
        self.max_items = max_items

    def read(self, value: Any, path: str) -> list[Any]:
        if isinstance(value, dict) and all(_INT.match(k) for k in value):
            value = [value[k] for k in sorted(value, key=int)]
        if not isinstance(value, list):
            raise invalid(f"Invalid array: {path}", param=path)
        if len(value) > self.max_items:
            raise invalid(f"Invalid array: {path} must have at most {self.max_items} items", param=path)
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


class Obj(Field):
    def __init__(
        self, fields: Mapping[str, Field], required: Iterable[str] = (), *, nullable: bool = False
    ) -> None:
        self.fields = dict(fields)
        self.required = tuple(required)
        self.nullable = nullable

    def read(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise invalid(f"Invalid object: {path or 'body'}", param=path or None)
        out: dict[str, Any] = {}
        for name, raw in value.items():
            field = self.fields.get(name)
            if field is None:
                raise parameter_unknown(_join(path, name))
            out[name] = field.check(raw, _join(path, name))
        for name in self.required:
            if out.get(name) is None:
                raise parameter_missing(_join(path, name))
        return out


def validate(schema: Obj, params: dict[str, Any]) -> dict[str, Any]:
    """Validate top-level params, raising the first error Stripe would report."""
    return schema.read(params, "")


def require_one(params: Mapping[str, Any], *names: str) -> None:
    """Stripe's 400 when none of several alternative parameters was given."""
    if all(params.get(n) is None for n in names):
        raise parameter_missing(" or ".join(names))


def exclusive(params: Mapping[str, Any], *names: str) -> None:
    """Stripe's `parameters_exclusive` when more than one of the names is set."""
    given = [n for n in names if params.get(n) is not None]
    if len(given) > 1:
        raise invalid(
            f"You may only specify one of these parameters: {', '.join(names)}.",
            param=given[1],
            code="parameters_exclusive",
        )


__all__ = [
    "Arr",
    "Bool",
    "Dec",
    "EmulatorError",
    "Enum",
    "Field",
    "Int",
    "IntOr",
    "Map",
    "Obj",
    "Str",
    "exclusive",
    "parse_form",
    "require_one",
    "validate",
]
