"""What every handler shares: the request context, the route table entry and list pagination."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._errors import EmulatorError, invalid, missing
from ._params import Arr, Field, Int, Map, Obj, Str
from ._state import Obj as Json
from ._state import State, is_legacy_version


@dataclass(slots=True)
class Ctx:
    """One request as a handler sees it."""

    state: State
    stripe_version: str | None
    request_id: str
    token: str = ""
    expand: list[str] = field(default_factory=list)

    @property
    def legacy(self) -> bool:
        return is_legacy_version(self.stripe_version)


Handler = Callable[[Ctx, dict[str, Any], tuple[str, ...]], Json]
SchemaFor = Callable[[Ctx], Obj]


@dataclass(slots=True)
class Route:
    """One operation: `operation` is the name faults, latency and the request log use."""

    method: str
    pattern: re.Pattern[str]
    operation: str
    schema: Obj | SchemaFor
    handler: Handler
    v2: bool = False
    #: Only served to `Stripe-Version`s before basil; later versions get Stripe's 404.
    legacy_only: bool = False

    def schema_for(self, ctx: Ctx) -> Obj:
        return self.schema if isinstance(self.schema, Obj) else self.schema(ctx)


def route(
    method: str,
    path: str,
    operation: str,
    schema: Obj | SchemaFor,
    handler: Handler,
    *,
    v2: bool = False,
    legacy_only: bool = False,
) -> Route:
    """A route; `{id}` in the path matches one path segment."""
    regex = "^" + re.sub(r"\{\w+\}", r"([^/]+)", path) + "$"
    return Route(method, re.compile(regex), operation, schema, handler, v2, legacy_only)


EXPAND = Arr(Str())
METADATA = Map()
LIST_FIELDS: dict[str, Field] = {
    "limit": Int(),
    "starting_after": Str(),
    "ending_before": Str(),
    "expand": EXPAND,
}
RETRIEVE = Obj({"expand": EXPAND})


def list_schema(**extra: Field) -> Obj:
    return Obj({**LIST_FIELDS, **extra})


def paginate(objects: Iterable[Json], params: dict[str, Any], url: str) -> Json:
    """Stripe's list envelope, newest first, with `limit` (1-100) and cursor paging."""
    data = list(objects)[::-1]
    limit = params.get("limit", 10)
    if not 1 <= limit <= 100:
        raise invalid(
            "This value must be greater than or equal to 1 and less than or equal to 100.",
            param="limit",
        )
    ids = [o["id"] for o in data]
    if params.get("starting_after"):
        cursor = params["starting_after"]
        data = data[ids.index(cursor) + 1 :] if cursor in ids else []
    elif params.get("ending_before"):
        cursor = params["ending_before"]
        data = data[: ids.index(cursor)] if cursor in ids else []
        data = data[-limit:]
    return {
        "object": "list",
        "data": data[:limit],
        "has_more": len(data) > limit,
        "url": url,
    }


def get(table: dict[str, Json], kind: str, object_id: str, param: str | None = None) -> Json:
    """Look an object up or raise Stripe's 404 `resource_missing`."""
    obj = table.get(object_id)
    if obj is None or obj.get("deleted"):
        raise missing(kind, object_id, param=param)
    return obj


def deleted(object_id: str, kind: str) -> Json:
    return {"id": object_id, "object": kind, "deleted": True}


__all__ = [
    "EXPAND",
    "METADATA",
    "RETRIEVE",
    "Ctx",
    "EmulatorError",
    "Route",
    "deleted",
    "get",
    "list_schema",
    "paginate",
    "route",
]
