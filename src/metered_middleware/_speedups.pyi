from collections.abc import Awaitable, Callable, Collection

from starlette.types import Message, Send

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
