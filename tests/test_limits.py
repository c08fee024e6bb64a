"""The flusher's client-side limits: keyed locks (one call in flight per customer and meter)."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from metered_middleware._limits import KeyedLocks

pytestmark = pytest.mark.anyio


async def test_holders_of_a_shared_key_never_overlap_and_others_run_alongside() -> None:
    """Stripe allows one call in flight per customer and meter: two holds sharing a key run one after the
    other, while a hold of other keys runs meanwhile."""
    locks = KeyedLocks()
    inside: set[str] = set()
    overlaps: list[tuple[str, str]] = []
    order: list[str] = []

    async def call(name: str, keys: list[str], seconds: float) -> None:
        async with locks.hold(keys):
            overlaps.extend((name, other) for other in inside)
            inside.add(name)
            order.append(f"{name} in")
            await anyio.sleep(seconds)
            inside.discard(name)
            order.append(f"{name} out")

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "a", ["cus_1|m", "cus_2|m"], 0.05)
        await anyio.sleep(0.01)
        tg.start_soon(call, "b", ["cus_2|m", "cus_3|m"], 0.01)  # shares cus_2 with a: waits for it
        tg.start_soon(call, "c", ["cus_9|m"], 0.01)  # shares nothing: runs while a holds
    assert order.index("b in") > order.index("a out")
    assert order.index("c in") < order.index("a out")
    assert ("c", "a") in overlaps
    assert not {("b", "a"), ("a", "b")} & set(overlaps)
    assert len(locks) == 0  # nothing is kept for keys no one holds


async def test_holds_in_opposite_orders_do_not_deadlock() -> None:
    locks = KeyedLocks()
    done: list[int] = []

    async def call(i: int, keys: list[str]) -> None:
        for _ in range(50):
            async with locks.hold(keys):
                await anyio.lowlevel.checkpoint()
        done.append(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(call, i, ["x", "y", "z"] if i % 2 else ["z", "y", "x"])
    assert sorted(done) == list(range(6))
    assert len(locks) == 0


async def test_a_cancelled_waiter_or_a_failed_call_leaves_no_key_held() -> None:
    locks = KeyedLocks()
    holding = anyio.Event()
    release = anyio.Event()

    async def holder() -> None:
        async with locks.hold(["k"]):
            holding.set()
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await holding.wait()
        with anyio.move_on_after(0.05) as waited:
            async with locks.hold(["j", "k"]):
                pytest.fail("k is held")
        assert waited.cancelled_caught
        assert len(locks) == 1  # the holder's k; the cancelled waiter gave j back
        release.set()

    with pytest.raises(RuntimeError):
        async with locks.hold(["k"]):
            raise RuntimeError("Stripe call failed")
    assert len(locks) == 0
    with anyio.fail_after(1):
        async with locks.hold(["j", "k"]):
            pass
