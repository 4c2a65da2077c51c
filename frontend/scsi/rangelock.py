"""LBA range lock: makes COMPARE AND WRITE, ORWRITE and WRITE ATOMIC atomic (SBC-3 5.2, 5.3, 5.8).

SBC-3 5.3: the read, compare and write of a COMPARE AND WRITE are one atomic operation "with
respect to other commands" that access the same logical blocks. So are the read-OR-write of ORWRITE
and an atomic write (SBC-4 4.29). A command that only reads or only writes needs no atomicity of its
own, but it must neither land between the two halves of an atomic one nor tear its data.

Two kinds of holders:

- *shared*: every ordinary READ/WRITE/VERIFY/WRITE SAME/UNMAP. Shared holders never exclude each
  other (SCSI lets overlapping plain commands run concurrently).
- *exclusive*: CAW, ORWRITE, WRITE ATOMIC, and SANITIZE (the whole LU). An exclusive claim waits for
  the shared holders and the earlier exclusive claims that overlap it; a shared request that
  overlaps a pending or held exclusive claim waits for it to end (so exclusive claims cannot starve).

The common path has no exclusive claim anywhere: ``add_shared`` is then one dict insert and
``release_shared`` one dict delete, both O(1) and without awaiting. Only when an exclusive claim
exists do shared requests take the slow path (``acquire_shared``), which scans the few claims.

Ranges are half-open ``[start, end)`` in logical blocks. No I/O and no clock: the lock only parks
coroutines on futures, so unit tests drive interleavings deterministically.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Claim:
    start: int
    end: int
    held: bool = False
    #: Futures of requests that wait for this claim to end.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


def _overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


class RangeLock:
    """Shared/exclusive locks on half-open LBA ranges, with an O(1) path when nothing is exclusive."""

    __slots__ = ("_exclusive", "_shared", "_shared_waiters", "_tokens")

    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        self._shared: dict[int, tuple[int, int]] = {}
        #: Exclusive claims, pending or held, in the order they were made (dicts keep order).
        self._exclusive: dict[int, _Claim] = {}
        #: Exclusive claims waiting for shared holders to leave: woken when any shared holder does.
        self._shared_waiters: list[asyncio.Future[None]] = []

    # ---- shared ------------------------------------------------------------------------------------

    @property
    def uncontended(self) -> bool:
        """No exclusive claim exists: ``add_shared`` may be used without awaiting."""
        return not self._exclusive

    def add_shared(self, start: int, end: int) -> int:
        """Take a shared hold at once. Only valid when ``uncontended`` (the caller checks)."""
        token = next(self._tokens)
        self._shared[token] = (start, end)
        return token

    async def acquire_shared(self, start: int, end: int) -> int:
        """Take a shared hold, first waiting for every exclusive claim that overlaps the range."""
        while True:
            blocker = next(
                (c for c in self._exclusive.values() if _overlap(start, end, c.start, c.end)), None
            )
            if blocker is None:
                return self.add_shared(start, end)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            blocker.waiters.append(fut)
            await fut

    def release_shared(self, token: int) -> None:
        del self._shared[token]
        if self._shared_waiters:
            self._wake(self._shared_waiters)

    # ---- exclusive ---------------------------------------------------------------------------------

    async def acquire_exclusive(self, start: int, end: int) -> int:
        """Claim ``[start, end)`` exclusively: from now on overlapping shared requests wait; the
        claim is held once the overlapping shared holders and earlier exclusive claims are gone."""
        token = next(self._tokens)
        claim = self._exclusive[token] = _Claim(start, end)
        try:
            while True:
                earlier = next(
                    (
                        c
                        for t, c in self._exclusive.items()
                        if t < token and _overlap(start, end, c.start, c.end)
                    ),
                    None,
                )
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                if earlier is not None:
                    earlier.waiters.append(fut)
                elif any(_overlap(start, end, s, e) for s, e in self._shared.values()):
                    self._shared_waiters.append(fut)
                else:
                    claim.held = True
                    return token
                await fut
        except BaseException:
            self.release_exclusive(token)
            raise

    def release_exclusive(self, token: int) -> None:
        claim = self._exclusive.pop(token, None)
        if claim is not None:
            self._wake(claim.waiters)

    # ---- introspection (tests, metrics) ------------------------------------------------------------

    def holders(self) -> tuple[int, int]:
        """(shared holders, exclusive claims held)."""
        return len(self._shared), sum(1 for c in self._exclusive.values() if c.held)

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        pending, waiters[:] = list(waiters), []
        for fut in pending:
            if not fut.done():
                fut.set_result(None)
