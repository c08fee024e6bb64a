from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.types import Message, Scope, Send

from metered_middleware._target import BillingTarget

def find_cached(
    headers: list[tuple[bytes, bytes]],
    entries: dict[int, tuple[float, int, BillingTarget | None]],
    names: tuple[bytes, ...],
    bearer: bool,
    max_length: int,
    /,
) -> BillingTarget | None: ...
def monotonic() -> float: ...
def bind_target(cls: type, /) -> None: ...
def group_by_shard(
    buffer: dict[str, int], targets: dict[str, BillingTarget], shards: int, /
) -> list[tuple[int, list[tuple[BillingTarget, int]]]]: ...
def encode_lines(
    lines: list[tuple[BillingTarget, int]],
    retention: int,
    sent: dict[str, tuple[BillingTarget, float]],
    fresh_after: float,
    decide: Callable[[BillingTarget], str | None],
    /,
) -> tuple[list[int], list[int], list[bytes], list[str]]: ...

class CountingSend:
    def __init__(
        self,
        send: Send,
        target: BillingTarget,
        units: int,
        add: Callable[[BillingTarget, int], object],
        statuses: Collection[int],
        /,
    ) -> None: ...
    def __call__(self, message: Message, /) -> Awaitable[None]: ...

class FastPath:
    def __init__(
        self,
        *,
        entries: dict[int, tuple[float, int, BillingTarget | None]],
        names: tuple[bytes, ...],
        bearer: bool,
        max_length: int,
        add: Callable[[BillingTarget, int], object],
        statuses: Collection[int],
        counter: Any,
        closed: bool,
        weigh: Callable[[Scope], int] | None,
        excluded: dict[str, bool] | None,
    ) -> None: ...
    def __call__(self, scope: Scope, send: Send, /) -> Send | None: ...

class Tally:
    armed: bool
    @property
    def counted_units(self) -> int: ...
    @property
    def counted_requests(self) -> int: ...
    @property
    def overflow_units(self) -> int: ...
    def __init__(
        self, max_targets: int, wake: Callable[[], object], overflow: Callable[[], object]
    ) -> None: ...
    def add(self, target: BillingTarget, units: int, /) -> None: ...
    def take(self) -> tuple[dict[str, int], dict[str, BillingTarget]]: ...
    def __len__(self) -> int: ...
