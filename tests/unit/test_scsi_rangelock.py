"""RangeLock: shared holders run together, exclusive claims exclude overlapping holders both ways."""

from __future__ import annotations

import asyncio

import pytest

from frontend.scsi.rangelock import RangeLock
from tests.unit.test_scsi_helpers import settle


async def test_shared_holds_are_o1_and_do_not_exclude_each_other() -> None:
    lock = RangeLock()
    assert lock.uncontended
    a = lock.add_shared(0, 10)
    b = lock.add_shared(5, 15)
    assert lock.holders() == (2, 0)
    lock.release_shared(a)
    lock.release_shared(b)
    assert lock.holders() == (0, 0)


async def test_exclusive_waits_for_overlapping_shared_holder_only() -> None:
    lock = RangeLock()
    held = lock.add_shared(0, 8)
    elsewhere = asyncio.create_task(lock.acquire_exclusive(8, 16))  # adjacent: no overlap
    overlapping = asyncio.create_task(lock.acquire_exclusive(6, 8))
    await settle()
    assert elsewhere.done()
    assert not overlapping.done()
    assert not lock.uncontended
    lock.release_shared(held)
    await settle()
    assert overlapping.done()
    lock.release_exclusive(elsewhere.result())
    lock.release_exclusive(overlapping.result())
    assert lock.uncontended


async def test_shared_request_waits_for_a_pending_exclusive_claim() -> None:
    """A pending exclusive claim blocks new overlapping shared requests (no starvation), and those
    run once it is released."""
    lock = RangeLock()
    first = lock.add_shared(0, 4)
    exclusive = asyncio.create_task(lock.acquire_exclusive(0, 4))
    await settle()
    assert not exclusive.done()
    late_reader = asyncio.create_task(lock.acquire_shared(2, 3))
    other_range = asyncio.create_task(lock.acquire_shared(100, 101))
    await settle()
    assert not late_reader.done()
    assert other_range.done()
    lock.release_shared(first)
    await settle()
    assert exclusive.done() and not late_reader.done()
    lock.release_exclusive(exclusive.result())
    await settle()
    assert late_reader.done()
    lock.release_shared(late_reader.result())
    lock.release_shared(other_range.result())
    assert lock.holders() == (0, 0)


async def test_overlapping_exclusive_claims_are_served_in_order() -> None:
    lock = RangeLock()
    order: list[str] = []

    async def claim(name: str, start: int, end: int, gate: asyncio.Event) -> None:
        token = await lock.acquire_exclusive(start, end)
        order.append(name)
        await gate.wait()
        lock.release_exclusive(token)

    gates = {n: asyncio.Event() for n in "abc"}
    tasks = [
        asyncio.create_task(claim("a", 0, 10, gates["a"])),
        asyncio.create_task(claim("b", 5, 6, gates["b"])),
        asyncio.create_task(claim("c", 9, 20, gates["c"])),
    ]
    await settle()
    assert order == ["a"]
    gates["a"].set()
    await settle()
    assert order == ["a", "b", "c"]  # b and c do not overlap each other: both proceed
    gates["b"].set()
    gates["c"].set()
    await asyncio.gather(*tasks)
    assert lock.uncontended


async def test_cancelled_exclusive_waiter_leaves_no_claim_behind() -> None:
    lock = RangeLock()
    held = lock.add_shared(0, 1)
    waiter = asyncio.create_task(lock.acquire_exclusive(0, 1))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lock.uncontended
    lock.release_shared(held)
    token = lock.add_shared(0, 1)  # nothing left that would block
    lock.release_shared(token)
